/**
 * Keeps a publication Philotes made current while its source runs (src/common/publication.ts
 * says what each `keylessTables` asks for). Runs on the supervisor side because it needs both
 * ends: a table joins the publication only after a snapshot of it is asked for in the buffer, so
 * that its rows written before it joined are copied (docs/design/publication.md). The order is
 * what makes it safe to crash anywhere: a request whose table never joined copies nothing and the
 * next round asks again; a table never joins without a request already stored.
 *
 * The source runner calls `keep` before a reader starts (so no snapshot begins before the tables
 * it names are published) and on its snapshot poll, serialised with it: a request stored here is
 * only handed to the reader after the table it names has joined.
 */
import type { SourceConfig } from '../common/config.js';
import { ConnectionError, describeConnectionError } from '../common/errors.js';
import type { Logger } from '../common/logger.js';
import { applyKeeping, planKeeping, someOf } from '../common/publication.js';
import { connectSource } from '../common/source-connection.js';
import type { BufferStore } from '../buffer/store.js';

/** Modes whose keeping changes the publication: looked at often, as new tables wait on it. */
const KEEP_INTERVAL_MS = 15_000;
/** Otherwise the keeper only tells of published tables whose writes fail. */
const WATCH_INTERVAL_MS = 60_000;

export interface KeeperReport {
  /** Published tables whose UPDATE and DELETE the source refuses, as last found; null: not looked. */
  readonly failingTables: readonly string[] | null;
}

export class PublicationKeeper {
  private lastRunAt = 0;
  private failing: readonly string[] | null = null;

  constructor(
    private readonly source: SourceConfig,
    private readonly store: BufferStore,
    private readonly log: Logger,
  ) {}

  report(): KeeperReport {
    return { failingTables: this.failing };
  }

  /** Keeps the publication if its interval has passed (or `now` is asked for); never throws. */
  async keep(now = false): Promise<void> {
    const interval =
      this.source.keylessTables === 'leave_out' || this.source.keylessTables === 'identity_full'
        ? KEEP_INTERVAL_MS
        : WATCH_INTERVAL_MS;
    if (!now && Date.now() - this.lastRunAt < interval) return;
    this.lastRunAt = Date.now();
    try {
      await this.keepOnce();
    } catch (error) {
      // A source that cannot be reached says so through its reader; this is only the keeper.
      const unreachable =
        describeConnectionError(
          error,
          'source',
          this.source.connection.host,
          this.source.connection.port,
        ) instanceof ConnectionError;
      this.log[unreachable ? 'debug' : 'warn'](
        { err: error },
        'could not keep the publication current; trying again',
      );
    }
  }

  private async keepOnce(): Promise<void> {
    const { source, log } = this;
    const client = await connectSource(source);
    try {
      const plan = await planKeeping(client, source);
      if (plan === null) {
        this.failing = null;
        return;
      }
      if (plan.add.length > 0) {
        // Stored before the tables join: see the header.
        const id = await this.store.requestSnapshot(source.id, plan.add);
        log.info(
          { snapshot: id, tables: plan.add },
          'new tables for the publication: a snapshot of them is asked for before they join',
        );
      }
      const kept = await applyKeeping(client, source, plan, log);
      if (kept.added.length > 0)
        log.warn(
          { publication: source.publication, tables: kept.added },
          `added ${kept.added.length} table(s) to the publication (keylessTables: leave_out); their rows are copied by the snapshot asked for`,
        );
      if (kept.dropped.length > 0)
        log.error(
          { publication: source.publication, tables: kept.dropped },
          `dropped ${someOf(kept.dropped)} from the publication: they lost their replica identity, and published their UPDATE and DELETE would fail on the source; their changes are no longer captured until they have a primary key again`,
        );
      if (kept.identityFull.length > 0)
        log.warn(
          { tables: kept.identityFull },
          `gave ${someOf(kept.identityFull)} REPLICA IDENTITY FULL (keylessTables: identity_full)`,
        );
      for (const { table, error } of kept.refused)
        log.error(
          { table, error },
          `could not keep ${table} as keylessTables: ${source.keylessTables} asks: ${error}`,
        );
      // A table the role may not add is only not captured (said above); one it may not alter
      // keeps failing the application's writes.
      const refusedFull = kept.refused
        .map((r) => r.table)
        .filter((t) => plan.identityFull.includes(t));
      const failing = [...plan.failing, ...refusedFull].filter(
        (t) => !kept.identityFull.includes(t) && !kept.dropped.includes(t),
      );
      if (failing.length > 0 && failing.join() !== this.failing?.join())
        log.error(
          { publication: source.publication, tables: failing.slice(0, 50), count: failing.length },
          `${failing.length} published table(s) have no replica identity: the source refuses UPDATE and DELETE on ${someOf(failing)}; give them a primary key (or REPLICA IDENTITY FULL), or set keylessTables`,
        );
      this.failing = failing;
    } finally {
      await client.end().catch(() => undefined);
    }
  }
}
