/**
 * This process's membership of the fleet and its leases (src/buffer/leases.ts): registered at
 * start, every lease renewed in one statement each interval, and a lease given up locally — its
 * reader stopped — before the buffer could let another member take it. The fence makes that last
 * rule a matter of latency, not of correctness: a store after the lease is gone fails anyway.
 */
import { hostname } from 'node:os';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../common/logger.js';
import { LeaseBook, type BufferStore, type HeldLease, type Member } from '../buffer/store.js';

export interface LeaseSettings {
  readonly leaseTtlMs: number;
  readonly leaseRenewIntervalMs: number;
  /** At most this many sources per process; 0: no bound but the fair share. */
  readonly maxSources: number;
}

/** A lease this process lost while it held it: its reader stops, and it stands by. */
export class LeaseLostError extends Error {
  constructor(
    readonly sourceId: string,
    readonly reason: string,
  ) {
    super(`lost the lease of source "${sourceId}": ${reason}`);
    this.name = 'LeaseLostError';
  }
}

/** A held lease and the promise that rejects when it is lost. */
export interface RunLease {
  readonly lease: HeldLease;
  readonly lost: Promise<never>;
}

export class LeaseKeeper {
  readonly member: Member;
  readonly book: LeaseBook;
  private liveMembers = 1;
  /**
   * performance.now() when the request that last set each held lease's expiry was sent (its
   * acquisition, then each renewal): the buffer counts the TTL from a moment after that.
   */
  private readonly countsFrom = new Map<string, number>();
  private renewTimer: NodeJS.Timeout | undefined;
  private deadlineTimer: NodeJS.Timeout | undefined;
  private renewing: Promise<void> | null = null;
  private renewFailures = 0;
  private readonly losers = new Map<string, (error: LeaseLostError) => void>();

  constructor(
    private readonly store: BufferStore,
    private readonly settings: LeaseSettings,
    private readonly log: Logger,
    /** How many sources the configuration names: the fair share is of these. */
    private readonly sources: () => number,
    /** This process's id (newMemberId), which its buffer sessions are named after. */
    memberId: string,
    version: string,
    role: Member['role'] = 'capture',
  ) {
    this.member = { id: memberId, role, host: hostname(), pid: process.pid, version };
    this.book = new LeaseBook(this.member.id);
  }

  /** Registers this member, then renews every interval and checks the deadlines more often. */
  async start(): Promise<void> {
    await this.renew().catch((error: unknown) =>
      this.log.warn({ err: error }, 'registering this process in the buffer failed; retrying'),
    );
    this.renewTimer = setInterval(() => {
      this.renewing ??= this.renew()
        .then(() => {
          if (this.renewFailures > 0)
            this.log.info({ failures: this.renewFailures }, 'renewing the leases works again');
          this.renewFailures = 0;
        })
        .catch((error: unknown) => {
          // Once per outage at warn: the buffer's own state is reported elsewhere.
          if (this.renewFailures++ === 0)
            this.log.warn({ err: error }, 'renewing the leases failed; retrying every interval');
        })
        .finally(() => (this.renewing = null));
    }, this.settings.leaseRenewIntervalMs);
    this.renewTimer.unref();
    // A check each quarter interval keeps a late timer from stretching the margin much.
    this.deadlineTimer = setInterval(
      () => this.checkDeadline(),
      Math.max(50, Math.min(250, this.settings.leaseRenewIntervalMs / 4)),
    );
    this.deadlineTimer.unref();
  }

  /**
   * Takes the source's lease if this process's fair share allows and nobody alive holds it.
   * Null: stand by and ask again later.
   */
  async acquire(sourceId: string): Promise<RunLease | null> {
    const share = Math.ceil(this.sources() / Math.max(1, this.liveMembers));
    const bound = this.settings.maxSources > 0 ? Math.min(share, this.settings.maxSources) : share;
    const held = this.book.all().filter((l) => l.sourceId !== sourceId).length;
    if (held >= bound) return null;
    const sentAt = performance.now();
    const result = await this.store.acquireLease(
      this.member.id,
      sourceId,
      this.settings.leaseTtlMs,
    );
    if (result.lease === null) {
      if (result.terminated > 0)
        this.log.warn(
          { source: sourceId, owner: result.heldBy, sessions: result.terminated },
          `the lease of source "${sourceId}" expired, but its owner ${result.heldBy} still held it in an open buffer transaction (a frozen process): terminated its ${result.terminated} buffer session(s) so that the source can be taken over`,
        );
      return null;
    }
    const { lease } = result;
    this.book.hold(lease);
    this.countsFrom.set(sourceId, sentAt);
    const lost = new Promise<never>((_, reject) => this.losers.set(sourceId, reject));
    lost.catch(() => undefined);
    this.log.info({ source: sourceId, epoch: lease.epoch }, 'lease acquired');
    return { lease, lost };
  }

  /** After the reader stopped and stored what it had: the lease is free for anyone. */
  async release(lease: HeldLease): Promise<void> {
    const held = this.book.get(lease.sourceId)?.epoch === lease.epoch;
    this.forget(lease);
    if (!held) return;
    await this.store
      .releaseLease(this.member.id, lease)
      .catch((error: unknown) =>
        this.log.warn(
          { err: error, source: lease.sourceId },
          'releasing the lease failed; it expires by itself',
        ),
      );
  }

  /** A clean stop, after every runner stopped: the member leaves. */
  async stop(): Promise<void> {
    clearInterval(this.renewTimer);
    clearInterval(this.deadlineTimer);
    await this.renewing;
    await this.store
      .leaveMembers(this.member.id)
      .catch((error: unknown) => this.log.warn({ err: error }, 'leaving the fleet failed'));
  }

  private async renew(): Promise<void> {
    const sentAt = performance.now();
    const { held, liveMembers } = await this.store.renewLeases(
      this.member,
      this.settings.leaseTtlMs,
    );
    this.liveMembers = liveMembers;
    const renewed = new Map(held.map((l) => [l.sourceId, l.epoch]));
    for (const lease of this.book.all()) {
      // Acquired after the renewal was sent: the renewal says nothing about it.
      if ((this.countsFrom.get(lease.sourceId) ?? 0) > sentAt) continue;
      if (renewed.get(lease.sourceId) === lease.epoch) this.countsFrom.set(lease.sourceId, sentAt);
      else this.lose(lease, 'another Philotes process holds it now');
    }
  }

  /**
   * The buffer counts a lease's TTL from its renewal's start, which is after we sent it: stopping
   * one renewal interval before TTL has passed since sending is always before it expires there.
   */
  private checkDeadline(): void {
    for (const lease of this.book.all()) {
      const since = performance.now() - (this.countsFrom.get(lease.sourceId) ?? 0);
      if (since < this.settings.leaseTtlMs - this.settings.leaseRenewIntervalMs) continue;
      this.lose(
        lease,
        `not renewed for ${Math.round(since / 100) / 10} s (lease TTL ${this.settings.leaseTtlMs / 1000} s): stopping before another process may take it`,
      );
    }
  }

  private forget(lease: HeldLease): void {
    if (this.book.get(lease.sourceId)?.epoch !== lease.epoch) return;
    this.book.drop(lease.sourceId, lease);
    this.losers.delete(lease.sourceId);
    this.countsFrom.delete(lease.sourceId);
  }

  private lose(lease: HeldLease, reason: string): void {
    const reject = this.losers.get(lease.sourceId);
    this.forget(lease);
    this.log.warn({ source: lease.sourceId, epoch: lease.epoch }, `lease lost: ${reason}`);
    reject?.(new LeaseLostError(lease.sourceId, reason));
  }
}
