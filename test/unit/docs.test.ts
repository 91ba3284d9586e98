/**
 * The docs held equal to the code: docs/configuration.md's tables and philotes.example.yaml to
 * the settings registry, docs/operations.md's fatal-state table to the error policy (a row per
 * code, with its anchor), docs/buffer-schema.md and the skip list to the tables the migrations
 * create, and every doc page linked from somewhere and every relative link pointing at a file.
 * A failure prints the rows the code expects.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  CONFIG_FILE_SETTING,
  CONNECTION_FIELDS,
  PROCESS_SETTINGS,
  SOURCE_IDENTITY,
  SOURCE_SETTINGS,
} from '../../src/common/config-registry.js';
import { BUFFER_TABLES } from '../../src/common/database-identity.js';
import { FATAL_CODES, policyOf } from '../../src/common/error-policy.js';

const ROOT = resolve(import.meta.dirname, '../..');
const read = (path: string) => readFileSync(join(ROOT, path), 'utf8');

/** The rows of the first markdown table after `heading`: cells without their backticks. */
function tableAfter(text: string, heading: string): string[][] {
  const start = text.indexOf(`\n${heading}\n`);
  if (start < 0) throw new Error(`no heading ${heading}`);
  const lines = text.slice(start).split('\n');
  const first = lines.findIndex((l) => l.startsWith('|'));
  const rows: string[][] = [];
  for (const line of lines.slice(first + 2)) {
    if (!line.startsWith('|')) break;
    rows.push(
      line
        .slice(1, -1)
        .split(' | ')
        .map((c) => c.trim()),
    );
  }
  return rows;
}

const code = (s: string) => `\`${s}\``;

/** The environment table as the registry says it must read. */
function environmentRows(): string[][] {
  const connection = (prefix: string, what: string) =>
    CONNECTION_FIELDS.map((f) => [
      code(`${prefix}_${f.suffix}`),
      code(f.default),
      `${what} ${f.doc}`,
    ]);
  const identity = Object.values(SOURCE_IDENTITY).map((s) => [code(s.env), code(s.default), s.doc]);
  return [
    [code(CONFIG_FILE_SETTING.env), code(CONFIG_FILE_SETTING.default), CONFIG_FILE_SETTING.doc],
    ...connection('PHILOTES_CDC_SOURCE', 'source'),
    ...identity,
    ...SOURCE_SETTINGS.map((s) => [code(s.env), code(s.default), s.doc]),
    ...connection('PHILOTES_BUFFER', 'buffer'),
    ...PROCESS_SETTINGS.map((s) => [code(s.env), code(s.default), s.doc]),
  ];
}

/** The file table as the registry says it must read. */
function fileRows(): string[][] {
  return [
    ...CONNECTION_FIELDS.map((f) => [code(`buffer.${f.fileKey}`), code(f.default), f.doc]),
    ...Object.values(SOURCE_IDENTITY).map((s) => [
      code(`sources[].${s.fileKey}`),
      code(s.fileKey === 'id' || s.fileKey === 'slot' ? 'required' : s.default),
      s.doc,
    ]),
    ...CONNECTION_FIELDS.map((f) => [code(`sources[].${f.fileKey}`), code(f.default), f.doc]),
    ...SOURCE_SETTINGS.map((s) => [
      code(`defaults.${s.fileKey}`) + ', ' + code(`sources[].${s.fileKey}`),
      code(s.default),
      s.doc,
    ]),
    ...PROCESS_SETTINGS.map((s) => [code(s.fileKey), code(s.default), `${s.doc} (${s.env} wins)`]),
  ];
}

const markdown = (rows: string[][]) => rows.map((r) => `| ${r.join(' | ')} |`).join('\n');

describe('docs/configuration.md and philotes.example.yaml', () => {
  const doc = read('docs/configuration.md');

  it('the environment table is the registry, row for row', () => {
    const expected = environmentRows();
    expect(markdown(tableAfter(doc, '## Environment')), markdown(expected)).toBe(
      markdown(expected),
    );
  });

  it('the file table is the registry, row for row', () => {
    const expected = fileRows();
    expect(markdown(tableAfter(doc, '## Configuration file')), markdown(expected)).toBe(
      markdown(expected),
    );
  });

  it('the example file gives every source setting under defaults, with its default', () => {
    const example = read('philotes.example.yaml');
    const defaults = example.slice(example.indexOf('\ndefaults:\n'), example.indexOf('\nsources:'));
    for (const s of SOURCE_SETTINGS)
      expect(defaults, s.fileKey).toMatch(new RegExp(`^  ${s.fileKey}: ${s.default} `, 'm'));
  });

  it('the example file names every process setting with its default and variable', () => {
    const example = read('philotes.example.yaml');
    for (const s of PROCESS_SETTINGS) {
      const value = s.default === 'on' ? 'true' : s.default;
      expect(example, s.fileKey).toMatch(
        new RegExp(`^# ${s.fileKey}: ${value.replace(/\./g, '\\.')} +# ${s.env}\\b`, 'm'),
      );
    }
  });

  it("the example file's sources use every source key", () => {
    const example = read('philotes.example.yaml');
    const sources = example.slice(example.indexOf('\nsources:\n'));
    for (const s of Object.values(SOURCE_IDENTITY))
      expect(sources, s.fileKey).toMatch(new RegExp(`^ +(- )?#? ?${s.fileKey}:`, 'm'));
  });
});

describe('docs/operations.md', () => {
  it('has a row per fatal code, with its anchor, and the error policy points at it', () => {
    const doc = read('docs/operations.md');
    const rows = tableAfter(doc, '## Fatal states and how to recover');
    const codes = rows
      .map((r) => /<a id="([a-z_]+)"><\/a>`([A-Z_]+)`/.exec(r[0] ?? ''))
      .filter((m) => m !== null)
      .map((m) => {
        expect(m![1]).toBe(m![2]!.toLowerCase());
        return m![2];
      });
    expect(codes).toEqual(FATAL_CODES);
    for (const c of FATAL_CODES) {
      const [page, anchor] = policyOf(c).docs.split('#');
      expect(page).toBe('docs/operations.md');
      expect(doc).toContain(`<a id="${anchor}"></a>`);
    }
  });
});

describe('the buffer tables', () => {
  it('BUFFER_TABLES (left out of a capture whose source is the buffer) are the tables the migrations create', () => {
    const created = [
      ...read('src/buffer/migrations.ts').matchAll(/CREATE TABLE IF NOT EXISTS (\w+)/g),
    ].map((m) => m[1]);
    expect([...BUFFER_TABLES].sort()).toEqual([...new Set(created)].sort());
  });

  it('docs/buffer-schema.md shows every one of them', () => {
    const doc = read('docs/buffer-schema.md');
    for (const table of BUFFER_TABLES) expect(doc, table).toContain(table);
  });
});

describe('the docs', () => {
  const pages = [
    'README.md',
    ...readdirSync(join(ROOT, 'docs'), { recursive: true, encoding: 'utf8' })
      .filter((f) => f.endsWith('.md'))
      .map((f) => join('docs', f)),
  ];

  it('every relative link points at a file that exists', () => {
    for (const page of pages) {
      for (const m of read(page).matchAll(/\]\(([^)#\s]+)(#[^)]*)?\)/g)) {
        const target = m[1]!;
        if (/^[a-z]+:/.test(target)) continue;
        expect(existsSync(resolve(ROOT, dirname(page), target)), `${page} -> ${target}`).toBe(true);
      }
    }
  });

  it('every page under docs/ is linked from another page', () => {
    const linked = new Set<string>();
    for (const page of pages)
      for (const m of read(page).matchAll(/\]\(([^)#\s]+\.md)(#[^)]*)?\)/g))
        linked.add(relative(ROOT, resolve(ROOT, dirname(page), m[1]!)));
    for (const page of pages.filter((p) => p !== 'README.md')) expect(linked, page).toContain(page);
  });
});
