/**
 * `philotes-worker check`: preflight the buffer and every source without changing anything (the
 * checks: check/, one file per thing checked); one printer for the findings, a table or --json.
 * Exit 0 ok, 1 warnings, 2 blockers.
 */
import type { Command } from 'commander';
import type { Finding } from './check/finding.js';
import { cliConfig } from './cli.js';
import { formatTable } from './output.js';

/** The findings as a table, and the verdict line under it. */
export function renderFindings(findings: readonly Finding[], code: number): string {
  const table = formatTable(
    ['TARGET', 'CHECK', 'RESULT', 'DETAIL'],
    findings.map((f) => [
      f.target,
      f.check,
      f.verdict.toUpperCase(),
      f.fix ? `${f.detail} -> fix: ${f.fix}` : f.detail,
    ]),
  );
  const blockers = findings.filter((f) => f.verdict === 'blocker').length;
  const warnings = findings.filter((f) => f.verdict === 'warning').length;
  const verdict =
    code === 0
      ? 'ready to run'
      : code === 1
        ? 'runs, but look at the warnings'
        : 'fix the blockers first';
  return `${table}\n\n${blockers} blocker(s), ${warnings} warning(s): ${verdict}`;
}

async function check(opts: { json?: boolean }): Promise<void> {
  const loaded = cliConfig();
  const [{ runChecks }, { exitCode }] = await Promise.all([
    import('./check/run-checks.js'),
    import('./check/finding.js'),
  ]);
  const findings = await runChecks(loaded);
  const code = exitCode(findings);
  if (opts.json) process.stdout.write(`${JSON.stringify({ exitCode: code, findings }, null, 2)}\n`);
  else process.stdout.write(`${renderFindings(findings, code)}\n`);
  process.exit(code);
}

export function registerCheck(program: Command): void {
  program
    .command('check')
    .description(
      'preflight the buffer and every configured source without changing anything (no migration, slot or publication is created): connection, wal_level, REPLICATION, free slots and WAL senders, the slot and the WAL it retains, continuity with the buffer, the publication and its tables, replica identities, SELECT on the tables a snapshot reads, the buffer schema and privileges; exit 0 ok, 1 warnings, 2 blockers',
    )
    .option('--json', 'one JSON document instead of a table')
    .action(check);
}
