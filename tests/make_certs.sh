#!/bin/sh
# Regenerates the TLS fixtures of the fake gateway in tests/tls/ (committed, so
# tests need no openssl at run time):
#   ca.pem                  the test CA (valid 2000-2100, like every certificate here but expired.pem)
#   capath/<hash>.0         ca.pem in a hashed directory (what `openssl rehash` makes)
#   other-ca.pem, other-capath/<hash>.0   an unrelated CA that signed nothing here
#   key.pem                 the one private key of the server certificates below
#   localhost.pem           for 127.0.0.1, ::1 and localhost, signed by the test CA
#   other-host.pem          for gateway.example.com only, signed by the test CA
#   expired.pem             for 127.0.0.1 and localhost, signed by the test CA, expired in 2001
# Usage: sh tests/make_certs.sh   (needs the openssl command; takes a second)
set -eu
out=$(cd "$(dirname "$0")" && pwd)/tls
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
rm -rf "$out" && mkdir -p "$out/capath" "$out/other-capath"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1"; }
newkey ca.key
newkey other.key
newkey "$out/key.pem"

cat > ca.cnf <<CNF
[ca]
default_ca = test
[test]
dir = .
database = index.txt
new_certs_dir = .
serial = serial
certificate = $out/ca.pem
private_key = ca.key
default_md = sha256
policy = anything
copy_extensions = none
[anything]
organizationName = optional
commonName = supplied
[ca_cert]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = \$ENV::SAN
CNF
: > index.txt
echo 1000 > serial

# Validity starts in 2000, so a runner whose clock is behind this machine's still accepts them.
for ca in ca other; do
    openssl req -new -key $ca.key -subj "/O=tokenroute tests/CN=tokenroute $ca test CA" -out $ca.csr
    SAN= openssl ca -batch -config ca.cnf -selfsign -keyfile $ca.key -extensions ca_cert -notext \
        -startdate 20000101000000Z -enddate 21000101000000Z -in $ca.csr -out "$out/$ca.pem" 2>/dev/null
done
mv "$out/other.pem" "$out/other-ca.pem"
cp "$out/ca.pem" "$out/capath/$(openssl x509 -hash -noout -in "$out/ca.pem").0"
cp "$out/other-ca.pem" "$out/other-capath/$(openssl x509 -hash -noout -in "$out/other-ca.pem").0"

sign() {  # name, subject alt names, validity options
    name=$1 san=$2
    shift 2
    openssl req -new -key "$out/key.pem" -subj "/CN=$name" -out "$name.csr"
    SAN=$san openssl ca -batch -config ca.cnf -extensions server -notext -in "$name.csr" -out "$out/$name.pem" "$@" \
        2>/dev/null
}
sign localhost "DNS:localhost,IP:127.0.0.1,IP:::1" -startdate 20000101000000Z -enddate 21000101000000Z
sign other-host "DNS:gateway.example.com" -startdate 20000101000000Z -enddate 21000101000000Z
sign expired "DNS:localhost,IP:127.0.0.1,IP:::1" -startdate 20000101000000Z -enddate 20010101000000Z
ls "$out" "$out/capath" "$out/other-capath"
