#!/usr/bin/env node
// Thin launcher: run the bundled tokenroute.py with a Python 3.9+ found on
// this machine, passing argv, stdio and the exit status straight through.
"use strict";
const childProcess = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

const SCRIPT = path.join(__dirname, "..", "tokenroute.py");
const VERSION_CHECK = "import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)";
const NO_PYTHON =
  "error: tokenroute needs Python 3.9 or newer; install it from " +
  "https://www.python.org/downloads/ (or set TOKENROUTE_PYTHON)\n";

function candidates() {
  const found = process.env.TOKENROUTE_PYTHON ? [[process.env.TOKENROUTE_PYTHON]] : [];
  if (process.platform === "win32") return found.concat([["py", "-3"], ["python"], ["python3"]]);
  return found.concat([["python3"], ["python"]]);
}

function findPython() {
  for (const [cmd, ...args] of candidates()) {
    const check = childProcess.spawnSync(cmd, [...args, "-c", VERSION_CHECK], { stdio: "ignore" });
    if (check.status === 0) return [cmd, args];
  }
  return null;
}

if (!fs.existsSync(SCRIPT)) {
  process.stderr.write(`error: ${SCRIPT} is missing; run "node scripts/copy-cli.js" in npm/\n`);
  process.exit(1);
}
const python = findPython();
if (python === null) {
  process.stderr.write(NO_PYTHON);
  process.exit(1);
}
const [cmd, args] = python;
const child = childProcess.spawn(cmd, [...args, SCRIPT, ...process.argv.slice(2)], { stdio: "inherit" });

// Ctrl-C reaches the child through the terminal's process group: stay alive
// until it exits. Signals sent to this process alone are passed on.
const ignoreInterrupt = () => {};
const forward = (signal) => child.kill(signal);
process.on("SIGINT", ignoreInterrupt);
for (const signal of ["SIGTERM", "SIGHUP"]) process.on(signal, forward);

child.on("error", (err) => {
  process.stderr.write(`error: could not run ${cmd}: ${err.message}\n`);
  process.exit(1);
});
child.on("exit", (code, signal) => {
  if (signal === null) process.exit(code);
  process.removeAllListeners(signal);
  process.kill(process.pid, signal);
  process.exit(128 + os.constants.signals[signal]);
});
