/**
 * `snapshot: when_needed`: a source whose slot can no longer deliver what follows the buffer's
 * checkpoint (missing, invalidated, advanced by someone else, its WAL removed) recovers by itself
 * instead of stopping. The gap is recorded in cdc_gaps exactly as `reset-source --accept-gap`
 * records it, and a snapshot of every published table begins in the same buffer transaction, so
 * the buffer rebuilds the tables despite the gap. Loudly: an error line, and the metric.
 */
import type { SourceConfig } from '../common/config.js';
import { isFatalCode, policyOf } from '../common/error-policy.js';
import type { Logger } from '../common/logger.js';
import type { BufferStore } from '../buffer/store.js';
import { resetWith, type ResetOutcome } from './reset-source.js';
import { connectSource } from '../common/source-connection.js';

/** The reader's fatal codes that mean changes were lost, which a snapshot makes good. */
export function isLostChanges(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return isFatalCode(code) && policyOf(code).retry === 'recover_with_snapshot';
}

/**
 * Records the gap, gets the slot into a state that delivers again and begins the snapshot. The
 * caller holds the source's lock. Null when there was nothing to recover from after all.
 */
export async function recoverLostSlot(
  store: BufferStore,
  source: SourceConfig,
  log: Logger,
): Promise<ResetOutcome | null> {
  const client = await connectSource(source);
  try {
    const outcome = await resetWith(
      store,
      client,
      source,
      { sourceId: source.id, acceptGap: true, skipToCurrent: false, snapshot: 'when_needed' },
      log,
      // The command's report is for a person at a terminal; here the log and the caller's error
      // line say it.
      () => undefined,
    );
    return outcome.gap === null ? null : outcome;
  } finally {
    await client.end().catch(() => undefined);
  }
}
