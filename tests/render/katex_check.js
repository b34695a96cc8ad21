#!/usr/bin/env node
/*
 * katex_check.js -- does each math snippet parse and render with KaTeX?
 *
 * stdin : JSON array of {"tex": "<latex math, no $ delimiters>", "display": true|false}
 * stdout: JSON array, same length and order, of {"ok": bool, "error": string|null}
 *
 * Exit status: 0 whenever the input was well formed (even if every snippet
 * failed); 2 if stdin is not a JSON array of such objects (message on stderr).
 *
 * Settings used for every snippet (see tests/render/tools.py for the caller):
 *   displayMode  : the snippet's "display" flag
 *   throwOnError : true   -- a parse error is an error, not red text in the output
 *   strict       : "error" by default. KaTeX then also throws on input that it
 *                  *could* render but that real LaTeX would reject or treat
 *                  differently, e.g. raw Unicode text letters in math mode
 *                  (unicodeTextInMathMode), "%" comments with no newline at the
 *                  end (commentAtEnd), \kern with mu units (mathVsTextUnits),
 *                  \\ at the top level of display math (newLineInDisplayMode),
 *                  too few {array} columns (textEnv), HTML extensions such as
 *                  \htmlClass (htmlExtension). We want exported math that works
 *                  both in KaTeX/MathJax *and* in pdflatex, so strict is right.
 *                  Override with `--strict=warn` or `--strict=ignore` (warnings
 *                  then go to stderr and the snippet counts as ok).
 *   trust        : a callback that refuses every command and records it. On
 *                  its own, an untrusted \href, \url, \includegraphics,
 *                  \htmlClass... does NOT throw in KaTeX (it is drawn as red
 *                  text even with throwOnError), so we turn it into an error
 *                  here: exported math should not rely on such commands.
 *   Note: \\ at the top level of display math is *not* an error even under
 *   strict "error": KaTeX then follows LaTeX and silently drops the line break.
 *   Use an aligned/gathered environment for multi-line display math.
 *   Each snippet is rendered on its own: \newcommand / \def in one snippet do
 *   not leak into the next (globalGroup false, fresh macros object per call).
 */
"use strict";

const katex = require("katex");

function fail(msg) {
    process.stderr.write(`katex_check.js: ${msg}\n`);
    process.exit(2);
}

let strict = "error";
for (const arg of process.argv.slice(2)) {
    const m = /^--strict=(error|warn|ignore)$/.exec(arg);
    if (m) {
        strict = m[1];
    } else if (arg === "--version") {
        process.stdout.write(`${katex.version}\n`);
        process.exit(0);
    } else {
        fail(`unknown argument ${JSON.stringify(arg)} ` +
             "(usage: katex_check.js [--strict=error|warn|ignore] [--version] < input.json)");
    }
}

const chunks = [];
process.stdin.on("data", (c) => chunks.push(c));
process.stdin.on("end", () => {
    let items;
    try {
        items = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (e) {
        fail(`stdin is not valid JSON: ${e.message}`);
    }
    if (!Array.isArray(items)) {
        fail("stdin must be a JSON array");
    }
    items.forEach((it, i) => {
        if (it === null || typeof it !== "object" || Array.isArray(it)) {
            fail(`item ${i} is not an object`);
        }
        if (typeof it.tex !== "string") {
            fail(`item ${i}: "tex" must be a string`);
        }
        if (it.display !== undefined && typeof it.display !== "boolean") {
            fail(`item ${i}: "display" must be true or false`);
        }
    });

    const results = items.map((it) => {
        const untrusted = [];
        try {
            katex.renderToString(it.tex, {
                displayMode: it.display === true,
                throwOnError: true,
                strict: strict,
                trust: (context) => {
                    untrusted.push(context.command);
                    return false;
                },
                macros: {},
            });
            if (untrusted.length > 0) {
                return {
                    ok: false,
                    error: `untrusted command(s) ${[...new Set(untrusted)].join(", ")} ` +
                           "(KaTeX renders them as red error text; trust is off)",
                };
            }
            return {ok: true, error: null};
        } catch (e) {
            const name = e instanceof katex.ParseError ? "ParseError" : (e && e.name) || "Error";
            const msg = e && e.message !== undefined ? e.message : String(e);
            return {ok: false, error: msg.startsWith("KaTeX parse error") ? msg : `${name}: ${msg}`};
        }
    });
    process.stdout.write(JSON.stringify(results) + "\n");
});
