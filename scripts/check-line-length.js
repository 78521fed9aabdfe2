#!/usr/bin/env node
// `make lint`: no tracked .ts/.js line is longer than 120 columns. Biome's formatter (biome.jsonc) wraps code at
// 120 but never breaks a string, a template literal or a comment, so a long one passes `biome ci` unnoticed.
// Prints `path:line: N columns` for each line over the limit and exits 1 if there is any, 0 otherwise.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');

const MAX_COLUMNS = 120;
const files = execFileSync('git', ['ls-files', '-z', '--', '*.ts', '*.js'], { encoding: 'utf8' })
  .split('\0')
  .filter((file) => file !== '' && !file.startsWith('bench/results/') && !/(^|\/)dist\//.test(file));
let over = 0;
for (const file of files) {
  fs.readFileSync(file, 'utf8')
    .split(/\r?\n/)
    .forEach((line, index) => {
      const columns = [...line].length;
      if (columns > MAX_COLUMNS) {
        over += 1;
        console.log(`${file}:${index + 1}: ${columns} columns`);
      }
    });
}
if (over > 0) {
  console.error(`${over} line(s) over ${MAX_COLUMNS} columns: split the string (same value) or rewrap the comment`);
  process.exit(1);
}
console.log(`${files.length} files, no line over ${MAX_COLUMNS} columns`);
