#!/usr/bin/env node
// Thin launcher: run the bundled tokenroute.py with a Python 3.9+ found on
// this machine, passing argv, stdio and the exit status straight through.
//
// Start-up is most of tokenroute's cost, so each run starts one Python only:
// the -c code below checks the version itself, then imports tokenroute (an
// import, unlike running the script, reads and writes __pycache__).
//
// Whether a candidate was a usable Python is never read from its exit status:
// `tokenroute run` passes its child's status through, so any status (86, 9009,
// ...) may be the user's command's. Instead the launcher creates an empty
// marker file and the -c code deletes it once it has passed the version check:
// a marker still there at exit means that candidate never got that far (too
// old, the Windows Store stub for python.exe, not a Python): try the next.
"use strict";
const childProcess = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

const PKG_DIR = path.join(__dirname, "..");
const SCRIPT = path.join(PKG_DIR, "tokenroute.py");
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
// The marker goes before tokenroute is imported, so nothing tokenroute runs
// can touch it. With -c, sys.argv is ["-c", ...args]: main() reads
// sys.argv[1:]. The "" (current directory) that -c puts first on sys.path is
// replaced by the package directory, as `python tokenroute.py` would have it.
function code(marker) {
  return [
    "import sys",
    "if sys.version_info < (3, 9): sys.exit(1)",
    "import os",
    `os.remove(${pyString(marker)})`,
    'if sys.path[:1] == [""]: del sys.path[0]',
    `sys.path.insert(0, ${pyString(PKG_DIR)})`,
    "import tokenroute",
    "sys.exit(tokenroute.main())",
  ].join("\n");
}

// The marker goes in the first of these folders where it can be made: TMPDIR
// may name a folder that is gone or read-only, where Python runs fine.
const MARKER_NAME = `tokenroute-launch-${process.pid}-${Math.random().toString(36).slice(2)}`;
const MARKER_FOLDERS = [...new Set([
  os.tmpdir(),
  ...(process.platform === "win32" ? [] : ["/tmp", "/var/tmp"]),
  ...homeFolder(),
  PKG_DIR,
])];
let MARKER = null;
process.on("exit", removeMarker);

function homeFolder() {
  try {
    return os.homedir() ? [os.homedir()] : [];
  } catch (err) {
    return []; // no HOME and no passwd entry
  }
}

function removeMarker() {
  if (MARKER === null) return;
  try {
    fs.unlinkSync(MARKER);
  } catch (err) {
    // already deleted by the -c code
  }
}

function createMarker() {
  const failures = [];
  for (const folder of MARKER_FOLDERS) {
    const candidate = path.join(folder, MARKER_NAME);
    try {
      // "wx": a new file only, never one planted under the name beforehand.
      fs.writeFileSync(candidate, "", { flag: "wx", mode: 0o600 });
      MARKER = candidate;
      return;
    } catch (err) {
      failures.push(`${folder}: ${err.code || err.message}`);
    }
  }
  process.stderr.write(
    `error: cannot create the launcher's marker file (how it tells a usable Python) in any of ${failures.join(", ")}; ` +
      "set TMPDIR to a writable folder\n"
  );
  process.exit(1);
}

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
  removeMarker();
  process.removeAllListeners(signal);
  process.kill(process.pid, signal);
  process.exit(128 + os.constants.signals[signal]);
}

// SIGTERM, SIGHUP and SIGINT sent to this process are passed on to Python
// (or, if none is running yet, end the launcher), then the launcher waits for
// its exit. Except for a Ctrl-C: the terminal sends it to its whole foreground
// process group, Python included, and a second one would be a second Ctrl-C
// to it (a "press again to force quit" for many programs). A SIGINT sent to
// the launcher alone (a parent's child.kill(), a container's stop signal, a
// kill from elsewhere while it runs in the background) is passed on.
let interrupts = 0;
const forward = (signal) => {
  if (child === null || child.pid === undefined) dieBy(signal);
  else if (!(signal === "SIGINT" && fromTerminal())) child.kill(signal);
};
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(signal, forward);

// Whether a SIGINT is likely a Ctrl-C that reached Python too. Linux tells:
// this process's group is its terminal's foreground group (fields pgrp and
// tpgid of /proc/self/stat, after the name in parentheses). Elsewhere only the
// first is judged, by a terminal on stdin; any later one is passed on.
function fromTerminal() {
  interrupts += 1;
  try {
    const stat = fs.readFileSync("/proc/self/stat", "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields[2] === fields[5];
  } catch (err) {
    return interrupts === 1 && require("tty").isatty(0);
  }
}

function run(remaining) {
  if (remaining.length === 0) {
    process.stderr.write(NO_PYTHON);
    process.exit(1);
  }
  const [[cmd, ...args], ...rest] = remaining;
  const argv = [...args, "-c", code(MARKER), ...process.argv.slice(2)];
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
  current.on("exit", (status, signal) => {
    if (done) return;
    done = true;
    child = null;
    if (signal === null) {
      const usable = !fs.existsSync(MARKER);
      if (!usable && CHOSEN) refuseChosen("is not Python 3.9 or newer");
      if (usable) process.exit(status);
      else run(rest);
      return;
    }
    dieBy(signal);
  });
}

createMarker(); // once: a candidate that was no usable Python leaves it for the next
run(candidates());
