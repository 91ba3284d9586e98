/**
 * Wake-ups for consumers: after a buffer commit moved a source's checkpoint (new events to
 * read), a NOTIFY on EVENTS_CHANNEL with the source id, so that a consumer LISTENing there reads
 * at once instead of polling. In a short transaction of its own, never in the capture
 * transaction (NOTIFY takes a global lock at commit), and at most one per source every
 * WAKEUP_INTERVAL_MS however many commits there were: all sources due go in one statement.
 * Best effort: a wake-up lost (the buffer away) costs a consumer its next poll, nothing more.
 */
import type pg from 'pg';
import type { Logger } from '../common/logger.js';

export const EVENTS_CHANNEL = 'philotes_events';
export const WAKEUP_INTERVAL_MS = 100;

export class EventWakeups {
  private readonly pending = new Set<string>();
  private lastSentAt = -Infinity;
  private timer: NodeJS.Timeout | null = null;
  private sending: Promise<void> | null = null;
  private stopped = false;

  constructor(
    private readonly pool: pg.Pool,
    private readonly log: Logger,
  ) {}

  /** The sources' checkpoints moved: their consumers will be woken. */
  stored(sourceIds: readonly string[]): void {
    if (this.stopped) return;
    for (const id of sourceIds) this.pending.add(id);
    this.schedule();
  }

  private schedule(): void {
    if (this.pending.size === 0 || this.timer !== null || this.sending !== null) return;
    const wait = Math.max(0, this.lastSentAt + WAKEUP_INTERVAL_MS - performance.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.sending = this.send().finally(() => {
        this.sending = null;
        if (!this.stopped) this.schedule();
      });
    }, wait);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    await this.sending;
  }

  private async send(): Promise<void> {
    const sources = [...this.pending];
    this.pending.clear();
    this.lastSentAt = performance.now();
    await this.pool
      .query(`SELECT pg_notify('${EVENTS_CHANNEL}', s) FROM unnest($1::text[]) AS s`, [sources])
      .catch((error: unknown) =>
        this.log.debug({ err: error, sources }, 'could not wake the consumers; they poll'),
      );
  }
}
