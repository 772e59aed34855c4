// prepack: ship a copy of ../tokenroute.py, refusing to pack a version mismatch.
"use strict";
const fs = require("fs");
const path = require("path");

const pkgDir = path.join(__dirname, "..");
const source = path.join(pkgDir, "..", "tokenroute.py");
const target = path.join(pkgDir, "tokenroute.py");

function fail(message) {
  process.stderr.write(`copy-cli: error: ${message}\n`);
  process.exit(1);
}

if (!fs.existsSync(source)) {
  fail(`${source} not found; run npm pack from npm/ inside the tokenroute repo`);
}
const match = /^__version__ = "(.*)"$/m.exec(fs.readFileSync(source, "utf8"));
const pkgVersion = require(path.join(pkgDir, "package.json")).version;
if (!match) fail(`no __version__ = "..." line in ${source}`);
if (match[1] !== pkgVersion) {
  fail(`npm/package.json version ${pkgVersion} != tokenroute.py __version__ ${match[1]}`);
}
fs.copyFileSync(source, target);
