/**
 * check predicts the run: every fatal code a run can stop a source with is either found by
 * `check` beforehand — a blocker of the finding its policy names, carrying that code, made by
 * the same rule the run applies — or listed, with the reason, as not knowable before the stream
 * meets it. A new fatal code without either fails here.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { FATAL_CODES, policyOf } from '../../src/common/error-policy.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../..');
const CHECK_DIR = join(ROOT, 'src/commands/check');
const checkSources = readdirSync(CHECK_DIR)
  .filter((f) => f.endsWith('.ts'))
  .map((f) => ({ file: f, text: readFileSync(join(CHECK_DIR, f), 'utf8') }));
const read = (path: string) => readFileSync(join(ROOT, path), 'utf8');

/**
 * Findings whose code comes from a shared rule rather than a literal: the rule's module must
 * raise the code itself. `check` and the run call the same function.
 */
const SHARED_RULES = [
  { uses: 'slotVerdict(', expression: 'problem.error.code', module: 'src/common/source-admin.ts' },
  {
    uses: 'slotVerdict(',
    expression: 'continuityProblem.error.code',
    module: 'src/common/source-admin.ts',
  },
  { uses: 'compareHistory(', expression: 'error.code', module: 'src/common/source-history.ts' },
];

function foundBy(code: string, check: string): string[] {
  const evidence: string[] = [];
  for (const { file, text } of checkSources) {
    if (!text.includes(`check: '${check}'`)) continue;
    if (text.includes(`code: '${code}'`)) evidence.push(`${file}: code '${code}'`);
    for (const rule of SHARED_RULES)
      if (
        text.includes(rule.uses) &&
        text.includes(`code: ${rule.expression},`) &&
        read(rule.module).includes(`'${code}'`)
      )
        evidence.push(`${file}: ${rule.uses} (${rule.module})`);
  }
  return evidence;
}

describe('every fatal code is found by check, or said to be unknowable beforehand', () => {
  it.each(FATAL_CODES)('%s', (code) => {
    const { beforehand } = policyOf(code);
    if ('unknowable' in beforehand) {
      expect(beforehand.unknowable.length).toBeGreaterThan(10);
      return;
    }
    expect(
      foundBy(code, beforehand.check),
      `no ${beforehand.check} finding carries ${code}`,
    ).not.toEqual([]);
  });

  it('most of them are knowable: only what the stream alone can show is not', () => {
    const unknowable = FATAL_CODES.filter((c) => 'unknowable' in policyOf(c).beforehand);
    expect(unknowable).toEqual(['WAL_REMOVED', 'VALUE_UNENCODABLE', 'TRANSACTION_TOO_LARGE']);
  });
});
