/**
 * Writes what this process says about one source into cdc_source_status, for `status` and
 * `check` (buffer/source-status.ts): on every change of state or error, and every 30 s while the
 * source runs, so that a row older than a minute tells of a process gone quiet. Best effort and
 * coalesced: one write in flight at most, the latest state wins, a failed write (the buffer down)
 * is only a debug line — the buffer's own state is reported elsewhere.
 */
import { hostname } from 'node:os';
import type { Logger } from '../common/logger.js';
import type { BufferStore } from '../buffer/store.js';
import { STATUS_REFRESH_MS, type SourceStatusRow } from '../buffer/source-status.js';

/** This process, as the rows name it. */
export const REPORTER = `${hostname()}:${process.pid}`;

export class StatusReporter {
  private dirty = false;
  private writing: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;

  constructor(
    private readonly store: BufferStore,
    private readonly sourceId: string,
    private readonly current: () => Omit<SourceStatusRow, 'sourceId' | 'reporter'>,
    private readonly log: Logger,
  ) {}

  start(): void {
    this.timer ??= setInterval(() => this.changed(), STATUS_REFRESH_MS);
    this.timer.unref();
    this.changed();
  }

  changed(): void {
    if (this.timer === null || this.stopped) return;
    this.dirty = true;
    this.writing ??= this.flush();
  }

  private async flush(): Promise<void> {
    while (this.dirty && !this.stopped) {
      this.dirty = false;
      try {
        await this.store.recordSourceStatus({
          sourceId: this.sourceId,
          reporter: REPORTER,
          ...this.current(),
        });
      } catch (error) {
        this.log.debug({ err: error }, 'could not record the source status in the buffer');
      }
    }
    this.writing = null;
  }

  /** At a clean stop: the row goes, so that nobody reads a stopped process as running. */
  async stop(): Promise<void> {
    if (this.timer === null || this.stopped) return;
    clearInterval(this.timer);
    this.stopped = true;
    await this.writing;
    await this.store.removeSourceStatus(this.sourceId, REPORTER).catch(() => undefined);
  }
}
