/**
 * What a running Philotes says about each source (cdc_source_status): `check` predicts a run,
 * and a run already under way that fails is the plainest prediction there is. A source a current
 * process reports failed is a blocker with its last error and the fix the run gives; one in
 * backoff a warning; streaming, or standing by, is fine. Rows from a process gone quiet are
 * history and not reported as its state.
 */
import type { SourceConfig } from '../../common/config.js';
import { fixFor, isFatalCode } from '../../common/error-policy.js';
import { isCurrent, type ReportedStatus } from '../../buffer/source-status.js';
import type { Finding } from './finding.js';

export function runningFindings(
  source: SourceConfig,
  reports: readonly ReportedStatus[],
): Finding[] {
  const current = reports.filter(isCurrent);
  if (current.length === 0) return [];
  // A standby beside the process that captures says nothing about the capture.
  const active = current.find((r) => r.state !== 'standby') ?? current[0]!;
  const by = `Philotes on ${active.reporter}`;
  if (active.state === 'streaming' || active.state === 'standby')
    return [
      {
        target: source.id,
        check: 'running',
        verdict: 'ok',
        detail: `${by} reports it ${active.state}${active.lastError ? ` (its last error, before: ${active.lastError})` : ''}`,
        fix: null,
      },
    ];
  const failed = active.state === 'failed';
  const error =
    active.lastError === null
      ? ''
      : `: ${active.lastErrorCode ? `${active.lastErrorCode}: ` : ''}${active.lastError}`;
  return [
    {
      target: source.id,
      check: 'running',
      verdict: failed ? 'blocker' : 'warning',
      code: failed && isFatalCode(active.lastErrorCode) ? active.lastErrorCode : undefined,
      detail: `${by} reports it ${active.state} since ${active.since}${error}`,
      fix:
        fixFor(active.lastErrorCode, source) ??
        (failed ? 'see the error; the source is tried again by itself once it is fixed' : null),
    },
  ];
}
