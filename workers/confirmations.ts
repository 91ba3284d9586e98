/**
 * The rule the reader exists to keep, with no I/O: the position confirmed to the source never
 * passes what the supervisor has reported durable in the buffer, or, when nothing of ours is in
 * flight at all, the server's WAL end, which holds no change of ours. And no position past the
 * stored checkpoint is confirmed before the buffer records it (so that a slot found further on
 * at the next start was moved by someone else).
 *
 * The reader tells it what happened (batches sent and stored, keepalives, records; the commits
 * read it learns from the batch builder, their one owner)
 * and asks it what to do (`next`): which position to confirm, and which to ask the buffer to
 * record first.
 */
/** Where the last commit read ends (a Number: it moves with every transaction). */
export interface CommitPosition {
  readonly lastCommitEnd: number;
}

export class Confirmations {
  /** Everything up to here is committed in the buffer. */
  private durableLsn: bigint;
  /** The buffer records that the slot may be confirmed this far. */
  private recordedLsn: bigint;
  /** The furthest position asked to be recorded. */
  private recordRequested = 0n;
  /** What was last confirmed to the source. */
  private confirmedLsn: bigint;
  /** A WAL end seen while nothing of ours was pending or in flight: it holds nothing of ours. */
  private idleWalEnd = 0n;
  /** The WAL end the last keepalive reported. */
  private keepaliveWalEnd = 0n;
  private batchSeq = 0;
  private durableSeq = 0;

  /**
   * @param startLsn where streaming starts: durable and confirmed by definition
   * @param recordedLsn how far the buffer already allows confirming
   * @param commits where the last commit read ends: the batch builder owns that position
   */
  constructor(
    startLsn: bigint,
    recordedLsn: bigint,
    private readonly commits: CommitPosition = { lastCommitEnd: 0 },
  ) {
    this.durableLsn = startLsn;
    this.confirmedLsn = startLsn;
    this.recordedLsn = recordedLsn;
  }

  // ---- what happened ----

  /** A batch went to the supervisor; returns its sequence number. */
  sent(): number {
    return ++this.batchSeq;
  }

  /** Batches up to `seq` are committed in the buffer; the checkpoint is `lsn` if they moved it. */
  durable(seq: number, lsn: bigint | null): void {
    if (seq > this.durableSeq) this.durableSeq = seq;
    if (lsn !== null && lsn > this.durableLsn) this.durableLsn = lsn;
  }

  /** The buffer now records `lsn` as confirmable. */
  recorded(lsn: bigint): void {
    if (lsn > this.recordedLsn) this.recordedLsn = lsn;
  }

  /**
   * A keepalive: keepalives come in stream order with the data, so when everything before this
   * one is handled and stored (`readerIdle` and nothing in flight), the server's WAL end holds
   * nothing more for us.
   */
  keepalive(walEnd: bigint, readerIdle: boolean): void {
    if (walEnd > this.keepaliveWalEnd) this.keepaliveWalEnd = walEnd;
    if (readerIdle && this.allDurable && walEnd > this.idleWalEnd) this.idleWalEnd = walEnd;
  }

  // ---- what it knows ----

  get inFlight(): number {
    return this.batchSeq - this.durableSeq;
  }

  get allDurable(): boolean {
    return this.batchSeq === this.durableSeq;
  }

  get confirmed(): bigint {
    return this.confirmedLsn;
  }

  get recordedUpTo(): bigint {
    return this.recordedLsn;
  }

  /**
   * Everything of this source's database up to here is in the buffer: the durable position, or
   * an idle WAL end (the WAL between holds only other databases' changes, or none). What the lag
   * is measured from, so that a busy neighbour's WAL does not count against an idle source.
   */
  get capturedUpTo(): bigint {
    return this.idleWalEnd > this.durableLsn ? this.idleWalEnd : this.durableLsn;
  }

  /** How far the server's WAL is known to reach: its last keepalive, or a later commit. */
  get serverWalEnd(): bigint {
    const commitEnd = BigInt(this.commits.lastCommitEnd);
    return commitEnd > this.keepaliveWalEnd ? commitEnd : this.keepaliveWalEnd;
  }

  /**
   * The highest position that is safe to confirm now: the durable one, or an idle WAL end while
   * nothing is pending or in flight (or while stopping, once everything sent is durable: what was
   * read but not handled is dropped and read again by the next run).
   */
  safeLsn(readerIdle: boolean, stopping: boolean): bigint {
    const idle = (readerIdle && this.allDurable) || stopping;
    return idle && this.idleWalEnd > this.durableLsn ? this.idleWalEnd : this.durableLsn;
  }

  /** Whether `lsn` still has to be asked to be recorded (neither recorded nor asked for yet). */
  askRecord(lsn: bigint): boolean {
    if (lsn <= this.recordedLsn || lsn <= this.recordRequested) return false;
    this.recordRequested = lsn;
    return true;
  }

  /**
   * What to do now. `confirm`: the position to send to the source, if it moved. `record`: a
   * position to have the buffer record first (it is confirmed once `recorded` says so); asked
   * once per position.
   */
  next(readerIdle: boolean, stopping: boolean): { confirm: bigint | null; record: bigint | null } {
    const safe = this.safeLsn(readerIdle, stopping);
    const limit = this.durableLsn > this.recordedLsn ? this.durableLsn : this.recordedLsn;
    const record = safe > limit && this.askRecord(safe) ? safe : null;
    const lsn = safe < limit ? safe : limit;
    if (lsn <= this.confirmedLsn) return { confirm: null, record };
    this.confirmedLsn = lsn;
    return { confirm: lsn, record };
  }
}
