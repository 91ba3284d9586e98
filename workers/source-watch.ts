/**
 * Watching the source while the reader streams it: a connection gone silent, the slot's WAL
 * retention and decoding statistics (for the metrics), the DDL capture trigger still in place,
 * the slot checked once more when streaming starts, the final confirmation read back at a stop,
 * and the walsender's warnings. Each finding that means a gap or a dead connection becomes the
 * reader's failure; the rest become messages to the supervisor. No timers of its own: the reader
 * calls it on its intervals.
 */
import { ddlTriggerCurrent } from '../src/common/ddl-capture.js';
import { FatalSourceError, SourceTimeoutError } from '../src/common/errors.js';
import type { Logger } from '../src/common/logger.js';
import { formatLsn, parseLsn } from '../src/common/lsn.js';
import type { ReaderMessage } from '../src/common/protocol.js';
import type { SourceConfig } from '../src/common/config.js';
import { retainedWalBytes, slotVerdict, where } from '../src/common/source-admin.js';
import { supports } from '../src/common/server-features.js';
import type { SourceNotice } from './replication-stream.js';
import { noticeGapError } from './source-errors.js';
import type { SourceSession } from './source-session.js';
import type { DdlGap } from './source-setup.js';

/** How long a stop waits for the server to take the final confirmation. */
const FINAL_CONFIRM_TIMEOUT_MS = 5_000;

/** What the watch needs of the reader it watches. */
export interface WatchedReader {
  readonly session: SourceSession;
  readonly source: SourceConfig;
  readonly log: Logger;
  readonly serverVersion: number;
  /** Where this run started streaming. */
  readonly startLsn: bigint;
  /** How far the buffer records the slot may be confirmed. */
  recordedUpTo(): bigint;
  confirmed(): bigint;
  /** Reading is paused waiting for the buffer: silence is then ours, not the source's. */
  waitingForBuffer(): boolean;
  /** Stopping or failed: the connection's silence means nothing now. */
  done(): boolean;
  failed(): boolean;
  post(message: ReaderMessage): void;
  fail(error: unknown): void;
  /** Sends the confirmed position again (a status update). */
  sendStatus(): void;
  /** Records `lsn` with a DDL gap and waits until the buffer has. */
  recordWith(lsn: bigint, extra: { ddlGap: DdlGap }): Promise<void>;
  /** The server's next 64-bit xid, read now: the reference for the stream's 32-bit ones. */
  noteNextXid(xid: bigint): void;
}

export class SourceWatch {
  private lastHeardAt = Date.now();
  /** Counts every message from the source; the silence check compares it, not the clock. */
  private received = 0;
  private receivedAtLastCheck = 0;
  /** Where the DDL capture trigger was last found in place (ddl: true). */
  private ddlVerifiedLsn: bigint | null = null;

  constructor(
    private readonly reader: WatchedReader,
    private readonly sourceTimeoutMs: number,
  ) {}

  /** A message arrived from the source (called for every one: a counter, not the clock). */
  noteReceived(): void {
    this.received++;
  }

  /** The source was heard from (a keepalive), or reading was paused by us and not silent. */
  noteHeard(): void {
    this.lastHeardAt = Date.now();
  }

  /**
   * A connection can die without a reset (a partition, a frozen server): nothing arrives and the
   * socket never errors. The reader asks the server for a reply with every periodic status
   * update, so silence longer than the source timeout means the connection is gone. Not while
   * the stream is held paused waiting for the buffer: then silence is ours.
   */
  checkSilence(): void {
    if (this.reader.waitingForBuffer() || this.reader.done()) return;
    if (this.received !== this.receivedAtLastCheck) {
      this.receivedAtLastCheck = this.received;
      this.lastHeardAt = Date.now();
    }
    const silent = Date.now() - this.lastHeardAt;
    if (silent > this.sourceTimeoutMs) this.reader.fail(new SourceTimeoutError(silent));
  }

  /**
   * The check prepareSource made before streaming, once more now that this connection holds the
   * slot and nobody else can move it: another client could have streamed it in between. Nothing
   * of the stream is handled before this passes (the stream is blocked while it runs).
   */
  async verifySlot(): Promise<void> {
    const { session, source, startLsn } = this.reader;
    const slot = await session.slotState();
    const record = { checkpointLsn: startLsn, confirmedLsn: this.reader.recordedUpTo() };
    const problem = slotVerdict(source, slot, await session.currentWal(), record);
    if (problem !== null) throw problem.error;
  }

  /** The WAL the source holds for the slot, for the metrics; a failed poll only skips a sample. */
  async reportSlot(): Promise<void> {
    const { session, serverVersion } = this.reader;
    if (this.reader.failed()) return;
    if (this.reader.source.ddl) await this.checkDdlCapture();
    if (this.reader.failed()) return;
    try {
      // One after the other: a pg client runs one query at a time.
      const slot = await session.slotState();
      const now = await session.currentWal();
      this.reader.noteNextXid(await session.nextXid(serverVersion));
      if (slot === null) return;
      const decoding = supports(serverVersion, 'slotStatistics')
        ? await session.slotDecodingStats()
        : null;
      this.reader.post({
        type: 'slot',
        retainedWalBytes: retainedWalBytes(slot, now),
        safeWalSizeBytes: slot.safeWalSize,
        walStatus: slot.walStatus,
        decoding,
      });
    } catch (error) {
      this.reader.log.debug({ err: error }, 'reading the slot state failed');
    }
  }

  /**
   * With `ddl: true`, the trigger must stay in place: dropped or disabled while Philotes runs,
   * DDL would go missing from the buffer without a word. The source stops and says so; a start
   * with a role that may install it puts it back.
   */
  private async checkDdlCapture(): Promise<void> {
    const { session, source } = this.reader;
    let state;
    let before: bigint;
    try {
      // Read first: DDL committed before this position ran while the trigger was still there
      // (it is, below), so it was captured.
      before = await session.currentWal();
      state = await session.ddlTriggerState();
    } catch (error) {
      this.reader.log.debug({ err: error }, 'reading the DDL capture trigger state failed');
      return;
    }
    if (ddlTriggerCurrent(state)) {
      this.ddlVerifiedLsn = before;
      return;
    }
    // DDL from the last check that found the trigger to now may be missing: recorded before the
    // source stops (the start that puts the trigger back records the rest, from the checkpoint).
    const from = this.ddlVerifiedLsn ?? this.reader.startLsn;
    // To the WAL now: past anything this run can still store, so the start that puts the
    // trigger back (its gap begins at the checkpoint) leaves no hole in between.
    const to = await session.currentWal().catch(() => before);
    await this.reader.recordWith(this.reader.recordedUpTo(), {
      ddlGap: { fromLsn: from, toLsn: to },
    });
    this.reader.fail(
      new FatalSourceError(
        `the DDL capture trigger on ${where(source)} was removed or disabled while Philotes ran: DDL made since ${formatLsn(from)} may be missing from the buffer (recorded in cdc_gaps, reason ddl_not_captured). A start with a superuser role (or philotes-worker ddl-trigger --source ${source.id}) puts it back`,
        'DDL_TRIGGER_MISSING',
        { ddlVerifiedLsn: formatLsn(from), detectedLsn: formatLsn(to) },
      ),
    );
  }

  /**
   * A status update is fire-and-forget; before closing, make sure the server has taken it, by
   * reading the slot back (and re-sending meanwhile). Bounded: the data is safe either way,
   * since a restart resumes from the buffer checkpoint; only the slot's WAL retention is at stake.
   */
  async waitForSlotConfirmation(): Promise<string | null> {
    const deadline = Date.now() + FINAL_CONFIRM_TIMEOUT_MS;
    let seen: string | null = null;
    while (!this.reader.failed()) {
      seen = await this.reader.session.slotConfirmedFlush();
      const confirmed = this.reader.confirmed();
      if (seen !== null && parseLsn(seen) >= confirmed) return seen;
      if (Date.now() >= deadline) {
        this.reader.log.warn(
          { confirmedLsn: formatLsn(confirmed), slotConfirmedFlushLsn: seen },
          'the source has not taken the final confirmation yet; it will be sent again on the next start',
        );
        return seen;
      }
      this.reader.sendStatus();
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return seen;
  }

  /** A warning from the walsender: one that means a gap stops the source (see source-errors). */
  onNotice(notice: SourceNotice): void {
    const gap = noticeGapError(notice, this.reader.source);
    if (gap !== null) {
      this.reader.fail(gap);
      return;
    }
    this.reader.log.warn(
      { notice: { severity: notice.severity, code: notice.code, message: notice.message } },
      'the source sent a warning on the replication connection',
    );
  }
}
