/**
 * What the source says on the replication connection that means a gap: errors rewritten to say
 * so and how to get past it, and the warning PostgreSQL 18 gives instead of an error.
 */
import type { SourceConfig } from '../src/common/config.js';
import { FatalSourceError } from '../src/common/errors.js';
import { policyOf } from '../src/common/error-policy.js';
import { publicationMissingError } from '../src/common/source-admin.js';
import type { SourceNotice } from './replication-stream.js';

/**
 * PostgreSQL 18 no longer fails on a publication that is missing at a point of the WAL: it warns
 * ("skipped loading publication") and leaves the changes out. That is a gap, so it stops the
 * source like PostgreSQL 15's error does. Matched by SQLSTATE and the quoted publication name,
 * which survive a translated server. Null for any other warning.
 */
export function noticeGapError(
  notice: SourceNotice,
  source: SourceConfig,
): FatalSourceError | null {
  if (notice.code !== '55000' || !notice.message?.includes(`"${source.publication}"`)) {
    return null;
  }
  return publicationMissingError(
    source,
    `was missing at a point of the WAL the slot decoded, and the server skipped the changes there (it said: ${notice.message})`,
    null,
  );
}

/** Source errors that mean a gap, rewritten to say so and how to get past it; others as they are. */
export function explainSourceError(error: unknown, source: SourceConfig): unknown {
  const e = error as { code?: unknown; message?: unknown; where?: unknown } | null;
  if (e === null || typeof e !== 'object' || typeof e.message !== 'string') return error;
  const at =
    typeof e.where === 'string' ? /LSN ([0-9A-F]+\/[0-9A-F]+)/i.exec(e.where)?.[1] : undefined;
  if (e.code === '42704' && e.message.includes(`"${source.publication}"`)) {
    return publicationMissingError(
      source,
      `did not exist at ${at ?? 'a point'} of the WAL the slot decoded (it was dropped, and perhaps created again since)`,
      at ?? null,
    );
  }
  if (e.code === '58P01') {
    return new FatalSourceError(
      `stopped: the source server has removed WAL that slot "${source.slot}" still needs (${e.message}); the changes in it can no longer be delivered. To record the gap in the buffer (cdc_gaps) and resume at a new slot: ${policyOf('WAL_REMOVED').fix(source)}`,
      'WAL_REMOVED',
      { slot: source.slot },
    );
  }
  return error;
}
