/**
 * This process's membership of the fleet and its leases (src/buffer/leases.ts): registered at
 * start, every lease renewed in one statement each interval, and a lease given up locally — its
 * reader stopped — before the buffer could let another member take it. The fence makes that last
 * rule a matter of latency, not of correctness: a store after the lease is gone fails anyway.
 *
 * Sharing: a member takes free leases up to its fair share, ceil(sources / live members) (and
 * maxSources); one above its share hands the surplus back gracefully, once it has held a lease
 * for the minimum hold time and only as many as the others have room for, so a newcomer gets
 * its share and nothing flaps. A lease released is announced (NOTIFY), and standbys take it at
 * once. The argument: docs/design/leases.md.
 */
import { hostname } from 'node:os';
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import type { Logger } from '../common/logger.js';
import type { ConnectionConfig } from '../common/config.js';
import { pgClientOptions } from '../common/pg-connection.js';
import {
  LEASES_CHANNEL,
  LeaseBook,
  bufferApplicationName,
  type PoolLeases,
  type HeldLease,
  type Member,
  type MemberLoad,
} from '../buffer/store.js';

export interface LeaseSettings {
  readonly leaseTtlMs: number;
  readonly leaseRenewIntervalMs: number;
  /** At most this many sources per process; 0: no bound but the fair share. */
  readonly maxSources: number;
  /** A lease is held at least this long before it is handed back to rebalance. */
  readonly rebalanceMinHoldMs: number;
}

/** How a lease of this process changed (philotes_lease_changes_total's reasons). */
export const LEASE_CHANGES = ['acquired', 'taken_over', 'released', 'expired', 'fenced'] as const;
export type LeaseChange = (typeof LEASE_CHANGES)[number];

/** What the keeper reports, for the metrics. */
export interface LeaseObserver {
  /** A change; `owned`: the sources it holds now (null: unchanged, as for `fenced`). */
  change(reason: LeaseChange, sourceId: string, owned: readonly string[] | null): void;
  /** Live capturing members, this one included. */
  members(live: number): void;
}

const NO_OBSERVER: LeaseObserver = { change: () => undefined, members: () => undefined };

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

/** Longest a standby waits between two looks at a lease (a NOTIFY or an expiry comes sooner). */
const STANDBY_POLL_MS = 2_000;

interface Holding {
  readonly lease: HeldLease;
  /** performance.now() at acquisition: the minimum hold time counts from it. */
  readonly acquiredAt: number;
  /**
   * performance.now() when the request that last set the expiry was sent (its acquisition, then
   * each renewal): the buffer counts the TTL from a moment after that.
   */
  countsFrom: number;
  readonly lose: (error: LeaseLostError) => void;
  handingBack: boolean;
}

export class LeaseKeeper {
  readonly member: Member;
  readonly book: LeaseBook;
  private members: MemberLoad[] = [];
  private readonly holdings = new Map<string, Holding>();
  /** Sources whose lease is being asked for right now. */
  private readonly acquiring = new Set<string>();
  private renewTimer: NodeJS.Timeout | undefined;
  private deadlineTimer: NodeJS.Timeout | undefined;
  private renewing: Promise<void> | null = null;
  private renewFailures = 0;
  /** Stopping: renewals say so (see leave()). */
  private leaving = false;
  /** Standbys waiting for a chance: woken by a NOTIFY, a hand-back here, or their timer. */
  private readonly waiters = new Map<string, () => void>();
  private listener: pg.Client | null = null;
  private stopped = false;
  /**
   * Asks the source's runner to hand its lease back gracefully (set by the supervisor); false
   * when it cannot now (its reader is still starting): asked again at the next renewal.
   */
  handBack: (sourceId: string) => boolean = () => false;

  constructor(
    private readonly store: PoolLeases,
    private readonly settings: LeaseSettings,
    private readonly log: Logger,
    /** How many sources the configuration names: the fair share is of these. */
    private readonly sources: () => number,
    /** This process's id (newMemberId), which its buffer sessions are named after. */
    memberId: string,
    version: string,
    role: Member['role'] = 'capture',
    /** The buffer, to LISTEN for released leases on (a capturing member only). */
    private readonly buffer: ConnectionConfig | null = null,
    private readonly observer: LeaseObserver = NO_OBSERVER,
    /** A consumer's group: it shares the group's leases with the group's members only. */
    group?: string,
  ) {
    this.member = { id: memberId, role, host: hostname(), pid: process.pid, version, group };
    this.book = new LeaseBook(this.member.id, (id) => this.holdings.get(id)?.lease);
    MEMBERS_HERE.add(memberId);
  }

  /** Registers this member, then renews every interval and checks the deadlines more often. */
  async start(): Promise<void> {
    await this.refresh();
    // A member that runs (captures or consumes), not a command holding a lease for a moment.
    if (this.member.role !== 'command') {
      const gone = await this.store
        .expireGoneMembers(
          this.member,
          (m) => !MEMBERS_HERE.has(m.id) && (m.pid === process.pid || processGone(m.pid)),
        )
        .catch(() => [] as string[]);
      if (gone.length > 0)
        this.log.info(
          { members: gone },
          'members of an earlier run on this host are gone: their leases are free now',
        );
      void this.listen();
    }
    this.renewTimer = setInterval(() => void this.refresh(), this.settings.leaseRenewIntervalMs);
    this.renewTimer.unref();
    // A check each quarter interval keeps a late timer from stretching the margin much.
    this.deadlineTimer = setInterval(
      () => this.checkDeadline(),
      Math.max(50, Math.min(250, this.settings.leaseRenewIntervalMs / 4)),
    );
    this.deadlineTimer.unref();
  }

  /** ceil(sources / live members), bounded by maxSources. */
  share(): number {
    const live = Math.max(1, this.members.length);
    const share = Math.ceil(this.sources() / live);
    return this.settings.maxSources > 0 ? Math.min(share, this.settings.maxSources) : share;
  }

  /** The sources this process holds leases of. */
  owned(): string[] {
    return [...this.holdings.keys()];
  }

  /** Who holds the source's lease: this member, or the one its last ask found (null: nobody). */
  ownerOf(sourceId: string): string | null {
    if (this.holdings.has(sourceId)) return this.member.id;
    return this.seen.get(sourceId)?.owner ?? null;
  }

  /** Live capturing members as the last renewal saw them, this one first. */
  fleet(): readonly MemberLoad[] {
    return this.members;
  }

  /**
   * Takes the source's lease if this process's share allows and nobody alive holds it; beyond
   * the share only one the others have left unowned for a TTL (a member at its maxSources, a
   * source another replica's configuration lacks). Null: stand by (waitForChance) and ask again.
   */
  async acquire(sourceId: string): Promise<RunLease | null> {
    // Every runner asks at once (at start, after a member died, at a NOTIFY): room is reserved
    // synchronously once the lease looks free, so that the ones in flight count too and only
    // those whose lease is free use it.
    const admit = (unownedForMs: number): boolean => {
      const held =
        [...this.holdings.keys()].filter((id) => id !== sourceId).length + this.acquiring.size;
      const cap = this.settings.maxSources;
      if (cap > 0 && held >= cap) return false;
      if (held >= this.share() && unownedForMs < this.settings.leaseTtlMs) return false;
      this.acquiring.add(sourceId);
      return true;
    };
    const sentAt = performance.now();
    let result: Awaited<ReturnType<PoolLeases['acquireLease']>>;
    try {
      result = await this.store.acquireLease(
        this.member.id,
        sourceId,
        this.settings.leaseTtlMs,
        admit,
      );
    } finally {
      this.acquiring.delete(sourceId);
    }
    if (result.lease === null) {
      const live = result.expiresInMs !== null && result.expiresInMs > 0;
      this.seen.set(sourceId, {
        owner: live ? result.heldBy : null,
        expiresInMs: result.expiresInMs,
      });
      if (result.terminated > 0)
        this.log.warn(
          { source: sourceId, owner: result.heldBy, sessions: result.terminated },
          `the lease of source "${sourceId}" expired, but its owner ${result.heldBy} still held it in an open buffer transaction (a frozen process): terminated its ${result.terminated} buffer session(s) so that the source can be taken over`,
        );
      return null;
    }
    const { lease } = result;
    this.seen.delete(sourceId);
    let lose: (error: LeaseLostError) => void = () => undefined;
    const lost = new Promise<never>((_, reject) => (lose = reject));
    lost.catch(() => undefined);
    this.holdings.set(sourceId, {
      lease,
      acquiredAt: sentAt,
      countsFrom: sentAt,
      lose,
      handingBack: false,
    });
    this.observer.change(result.event, sourceId, this.owned());
    this.log.info(
      { source: sourceId, epoch: lease.epoch, previous: result.previous },
      result.event === 'taken_over'
        ? `lease taken over from ${result.previous}, which let it expire`
        : 'lease acquired',
    );
    return { lease, lost };
  }

  /**
   * What a standby's last ask found: the member holding the lease, and when that lease expires
   * unless renewed (ms from the answer; null if nobody held it).
   */
  private readonly seen = new Map<string, { owner: string | null; expiresInMs: number | null }>();

  /**
   * A standby's wait before asking again: until a lease is released (NOTIFY), the one it waits
   * for would expire, or STANDBY_POLL_MS, whichever comes first.
   */
  async waitForChance(sourceId: string, signal: AbortSignal): Promise<void> {
    const expiresIn = this.seen.get(sourceId)?.expiresInMs ?? null;
    const ms =
      expiresIn === null
        ? STANDBY_POLL_MS
        : Math.max(20, Math.min(STANDBY_POLL_MS, expiresIn + 20));
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        if (this.waiters.get(sourceId) === done) this.waiters.delete(sourceId);
        signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.waiters.set(sourceId, done);
      signal.addEventListener('abort', done, { once: true });
    });
  }

  /** After the reader stopped and stored what it had: the lease is free for anyone. */
  async release(lease: HeldLease): Promise<void> {
    const held = this.holdings.get(lease.sourceId)?.lease.epoch === lease.epoch;
    this.forget(lease);
    // Given up here but perhaps still ours in the buffer (a deadline passed while renewals
    // failed): release it there too, or it would be renewed with the others and block the
    // source. A lease another member took is not touched (owner and epoch must match).
    await this.giveBack(lease);
    if (held) this.observer.change('released', lease.sourceId, this.owned());
  }

  /** A store of this source was refused by the fence (the caller stands by). */
  fenced(sourceId: string): void {
    this.observer.change('fenced', sourceId, null);
  }

  private async giveBack(lease: HeldLease): Promise<void> {
    await this.store
      .releaseLease(this.member.id, lease)
      .catch((error: unknown) =>
        this.log.warn(
          { err: error, source: lease.sourceId },
          'releasing the lease failed; it expires by itself',
        ),
      );
  }

  /**
   * A clean stop begins: this member still renews what its readers finish with, but says it is
   * leaving, so that the others stop counting it and take each lease the moment it is released.
   */
  async leave(): Promise<void> {
    this.leaving = true;
    await this.refresh();
  }

  /**
   * A renewal now, or the one in flight (the timer's, or one asked for so that a decision sees
   * today's members), then the rebalancing it allows. Never rejects.
   */
  private refresh(): Promise<void> {
    this.renewing ??= this.renew()
      .then(() => {
        if (this.renewFailures > 0)
          this.log.info({ failures: this.renewFailures }, 'renewing the leases works again');
        this.renewFailures = 0;
        this.rebalance();
      })
      .catch((error: unknown) => {
        // Once per outage at warn: the buffer's own state is reported elsewhere.
        if (this.renewFailures++ === 0)
          this.log.warn({ err: error }, 'renewing the leases failed; retrying every interval');
      })
      .finally(() => (this.renewing = null));
    return this.renewing;
  }

  /** A clean stop, after every runner stopped and released: the member leaves. */
  async stop(): Promise<void> {
    this.stopped = true;
    MEMBERS_HERE.delete(this.member.id);
    clearInterval(this.renewTimer);
    clearInterval(this.deadlineTimer);
    this.wake();
    await this.renewing;
    const listener = this.listener;
    this.listener = null;
    await listener?.end().catch(() => undefined);
    await this.store
      .leaveMembers(this.member.id)
      .catch((error: unknown) => this.log.warn({ err: error }, 'leaving the fleet failed'));
  }

  private async renew(): Promise<void> {
    const sentAt = performance.now();
    const { held, members } = await this.store.renewLeases(
      this.member,
      this.settings.leaseTtlMs,
      this.settings.maxSources,
      this.leaving,
    );
    this.members = members;
    this.observer.members(members.length);
    const renewed = new Map(held.map((l) => [l.sourceId, l.epoch]));
    for (const holding of [...this.holdings.values()]) {
      // Acquired after the renewal was sent: the renewal says nothing about it.
      if (holding.acquiredAt > sentAt) continue;
      if (renewed.get(holding.lease.sourceId) === holding.lease.epoch) holding.countsFrom = sentAt;
      else this.lose(holding.lease, 'another Philotes process holds it now');
    }
  }

  /**
   * Above the fair share: hand back the surplus the other members have room for (each up to its
   * share and maxSources), newest first, once held for the minimum hold time.
   */
  private rebalance(): void {
    if (this.member.role === 'command' || this.stopped || this.leaving) return;
    const share = this.share();
    const keeping = [...this.holdings.values()].filter((h) => !h.handingBack);
    const surplus = keeping.length - share;
    if (surplus <= 0) return;
    const live = Math.max(1, this.members.length);
    const fair = Math.ceil(this.sources() / live);
    const room = this.members
      .filter((m) => m.id !== this.member.id)
      .reduce((sum, m) => {
        const bound = m.capacity > 0 ? Math.min(fair, m.capacity) : fair;
        return sum + Math.max(0, bound - m.held);
      }, 0);
    const now = performance.now();
    const candidates = keeping
      .filter((h) => now - h.acquiredAt >= this.settings.rebalanceMinHoldMs)
      .sort((a, b) => b.acquiredAt - a.acquiredAt)
      .slice(0, Math.min(surplus, room));
    for (const holding of candidates) {
      if (!this.handBack(holding.lease.sourceId)) continue;
      holding.handingBack = true;
      this.log.info(
        { source: holding.lease.sourceId, share, held: keeping.length, members: live },
        `handing source "${holding.lease.sourceId}" back: this process holds ${keeping.length} sources, its fair share of ${live} members is ${share}`,
      );
    }
  }

  /**
   * The buffer counts a lease's TTL from its renewal's start, which is after we sent it: stopping
   * one renewal interval before TTL has passed since sending is always before it expires there.
   */
  private checkDeadline(): void {
    const now = performance.now();
    for (const holding of [...this.holdings.values()]) {
      const since = now - holding.countsFrom;
      if (since < this.settings.leaseTtlMs - this.settings.leaseRenewIntervalMs) continue;
      this.lose(
        holding.lease,
        `not renewed for ${Math.round(since / 100) / 10} s (lease TTL ${this.settings.leaseTtlMs / 1000} s): stopping before another process may take it`,
      );
    }
  }

  private forget(lease: HeldLease): void {
    if (this.holdings.get(lease.sourceId)?.lease.epoch !== lease.epoch) return;
    this.holdings.delete(lease.sourceId);
  }

  private lose(lease: HeldLease, reason: string): void {
    const holding = this.holdings.get(lease.sourceId);
    this.forget(lease);
    this.observer.change('expired', lease.sourceId, this.owned());
    this.log.warn({ source: lease.sourceId, epoch: lease.epoch }, `lease lost: ${reason}`);
    holding?.lose(new LeaseLostError(lease.sourceId, reason));
  }

  /** Wakes the standby of one source (its lease was released), or all of them. */
  private wake(sourceId?: string): void {
    if (sourceId !== undefined) this.waiters.get(sourceId)?.();
    else for (const waiter of [...this.waiters.values()]) waiter();
  }

  /**
   * LISTEN for released leases on a connection of its own, reconnecting while this member runs:
   * the standbys then take a lease the moment it is given back, not at their next poll.
   */
  private async listen(): Promise<void> {
    if (this.buffer === null) return;
    while (!this.stopped) {
      const client = new pg.Client(
        pgClientOptions(this.buffer, bufferApplicationName(this.member.id)),
      );
      const ended = new Promise<void>((resolve) => {
        client.on('error', () => resolve());
        client.on('end', () => resolve());
      });
      // A lease released: the member that released it may be leaving (a rolling update), and
      // the share is then larger. Renew first, so that the standby decides on today's members.
      client.on('notification', (message) => {
        const sourceId = message.payload ?? undefined;
        if (sourceId !== undefined && !this.waiters.has(sourceId)) return;
        void this.refresh().then(() => this.wake(sourceId));
      });
      try {
        await client.connect();
        await client.query(`LISTEN ${LEASES_CHANNEL}`);
        if (this.stopped) break;
        this.listener = client;
        // Released while we were not listening: ask now.
        this.wake();
        await ended;
      } catch {
        // The buffer is away: the standbys poll meanwhile.
      } finally {
        if (this.listener === client) this.listener = null;
        await client.end().catch(() => undefined);
      }
      if (!this.stopped) await new Promise((resolve) => setTimeout(resolve, STANDBY_POLL_MS));
    }
  }
}

/**
 * The members this very process runs (a consumer of two groups, a capture beside a consumer): a
 * member row of this host with this pid is an earlier run's only if it is not one of them.
 */
const MEMBERS_HERE = new Set<string>();

/** Whether no process with this pid runs on this host (signal 0 checks without signalling). */
function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ESRCH';
  }
}
