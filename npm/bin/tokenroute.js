#!/usr/bin/env node
// Thin launcher: run the bundled tokenroute.py with a Python 3.9+ found on
// this machine, passing argv, stdio and the exit status straight through.
//
// Start-up is most of tokenroute's cost, so each run starts one Python only:
// the -c code below checks the version itself, then imports tokenroute (an
// import, unlike running the script, reads and writes __pycache__).
"use strict";
const childProcess = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

const PKG_DIR = path.join(__dirname, "..");
const SCRIPT = path.join(PKG_DIR, "tokenroute.py");
// Exit status of the -c code on a Python older than 3.9: try the next
// candidate. tokenroute.main() never returns it (its codes are 0, 1, 2, 3
// and 130), so it cannot be mistaken for the CLI's own status.
const TOO_OLD = 86;
// What the Windows "App Execution Alias" stub for python.exe exits with (after
// printing an install hint) when no Python is installed: try the next one.
const WINDOWS_STORE_STUB = 9009;
const NO_PYTHON =
  "error: tokenroute needs Python 3.9 or newer; install it from " +
  "https://www.python.org/downloads/ (or set TOKENROUTE_PYTHON)\n";

// An ASCII-only Python string literal for s: parses the same on every Python
// (2.x included), whatever the characters in the install path.
function pyString(s) {
  let out = '"';
  for (const ch of s) {
    const code = ch.codePointAt(0);
    if (ch === '"' || ch === "\\") out += "\\" + ch;
    else if (code >= 0x20 && code < 0x7f) out += ch;
    else if (code <= 0xffff) out += "\\u" + code.toString(16).padStart(4, "0");
    else out += "\\U" + code.toString(16).padStart(8, "0");
  }
  return out + '"';
}

// Lines 1-2 must parse and run on any Python, 2.x included: no f-strings or
// other newer syntax before the check, and nothing printed when it fails.
// With -c, sys.argv is ["-c", ...args]: main() reads sys.argv[1:]. The ""
// (current directory) that -c puts first on sys.path is replaced by the
// package directory, as `python tokenroute.py` would have it.
const CODE = [
  "import sys",
  `if sys.version_info < (3, 9): sys.exit(${TOO_OLD})`,
  'if sys.path[:1] == [""]: del sys.path[0]',
  `sys.path.insert(0, ${pyString(PKG_DIR)})`,
  "import tokenroute",
  "sys.exit(tokenroute.main())",
].join("\n");

// TOKENROUTE_PYTHON, when set, is the only candidate: a typo in it must not
// quietly run another Python.
const CHOSEN = process.env.TOKENROUTE_PYTHON || "";

function candidates() {
  if (CHOSEN) return [[CHOSEN]];
  if (process.platform === "win32") return [["py", "-3"], ["python"], ["python3"]];
  return [["python3"], ["python"]];
}

function refuseChosen(reason) {
  process.stderr.write(
    `error: TOKENROUTE_PYTHON=${CHOSEN} ${reason}; point it at Python 3.9 or newer, or unset it\n`
  );
  process.exit(1);
}

if (!fs.existsSync(SCRIPT)) {
  process.stderr.write(`error: ${SCRIPT} is missing; run "node scripts/copy-cli.js" in npm/\n`);
  process.exit(1);
}

let child = null;

function dieBy(signal) {
  process.removeAllListeners(signal);
  process.kill(process.pid, signal);
  process.exit(128 + os.constants.signals[signal]);
}

// Ctrl-C reaches the child through the terminal's process group: stay alive
// until it exits. Signals sent to this process alone are passed on (or, if
// no Python is running yet, end the launcher).
const ignoreInterrupt = () => {};
const forward = (signal) => {
  if (child !== null && child.pid !== undefined) child.kill(signal);
  else dieBy(signal);
};
process.on("SIGINT", ignoreInterrupt);
for (const signal of ["SIGTERM", "SIGHUP"]) process.on(signal, forward);

function run(remaining) {
  if (remaining.length === 0) {
    process.stderr.write(NO_PYTHON);
    process.exit(1);
  }
  const [[cmd, ...args], ...rest] = remaining;
  const argv = [...args, "-c", CODE, ...process.argv.slice(2)];
  try {
    child = childProcess.spawn(cmd, argv, { stdio: "inherit" });
  } catch (err) {
    // Some spawn failures (ENOTDIR, ENAMETOOLONG, ...) throw instead of
    // emitting "error": this candidate cannot run, try the next.
    if (CHOSEN) refuseChosen(`cannot be run (${err.code || err.message})`);
    child = null;
    run(rest);
    return;
  }
  const current = child;
  let done = false;
  current.on("error", (err) => {
    if (done) return;
    if (current.pid === undefined) {
      // Not started (ENOENT, EACCES, ...): try the next candidate.
      if (CHOSEN) refuseChosen(`cannot be run (${err.code || err.message})`);
      done = true;
      child = null;
      run(rest);
      return;
    }
    process.stderr.write(`error: could not run ${cmd}: ${err.message}\n`);
    process.exit(1);
  });
  current.on("exit", (code, signal) => {
    if (done) return;
    done = true;
    child = null;
    if (signal === null) {
      const skip = code === TOO_OLD ||
        (process.platform === "win32" && code === WINDOWS_STORE_STUB);
      if (skip && CHOSEN) refuseChosen("is not Python 3.9 or newer");
      if (skip) run(rest);
      else process.exit(code);
      return;
    }
    dieBy(signal);
  });
}

run(candidates());
