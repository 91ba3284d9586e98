/**
 * All Prometheus metrics, owned by the supervisor (prom-client has no worker-thread support).
 * Readers report positions and the supervisor counts what it stores, so counters survive thread
 * restarts. Labels are bounded: source and operation only.
 */
import client from 'prom-client';
import type { SlotStatusMessage } from '../common/protocol.js';
import type { BatchWriterObserver, StoredGroupReport } from '../supervisor/batch-writer.js';
import { LEASE_CHANGES, type LeaseObserver } from '../supervisor/lease-keeper.js';
import type { BufferKeeperObserver } from '../supervisor/buffer-keeper.js';
import { LAG_COUNT_CAP } from '../buffer/consumer-stats.js';
import { SNAPSHOT_TABLE_STATES } from '../supervisor/snapshot-progress.js';
import { SOURCE_STATES } from '../supervisor/source-runner.js';

/** Every operation an event can have (its label values, created at 0 per source). */
const OPERATIONS = [
  'INSERT',
  'UPDATE',
  'DELETE',
  'TRUNCATE',
  'MESSAGE',
  'DDL',
  'SNAPSHOT',
] as const;
const SNAPSHOT_REASONS = ['initial', 'when_needed', 'on_demand'] as const;
/** The gaps `snapshot: when_needed` records by itself (reset-source's others need a person). */
const GAP_REASONS = ['slot_missing', 'slot_invalidated', 'slot_advanced'] as const;

const WAL_STATUSES = ['reserved', 'extended', 'unreserved', 'lost'] as const;

export class Metrics {
  readonly registry = new client.Registry();

  readonly events = new client.Counter({
    name: 'philotes_events_total',
    help: 'Change events committed to the buffer.',
    labelNames: ['source', 'operation'] as const,
    registers: [this.registry],
  });
  readonly transactions = new client.Counter({
    name: 'philotes_transactions_total',
    help: 'Source transactions completely committed to the buffer.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly batches = new client.Counter({
    name: 'philotes_batches_total',
    help: 'Batches received from readers and committed to the buffer.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly bufferBytes = new client.Counter({
    name: 'philotes_buffer_written_bytes_total',
    help: 'Bytes of encoded events copied into the buffer.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly bufferCommits = new client.Counter({
    name: 'philotes_buffer_commits_total',
    help: 'Buffer transactions committed (each may hold several coalesced batches).',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly bufferCommitSeconds = new client.Histogram({
    name: 'philotes_buffer_commit_duration_seconds',
    help: 'Time to store one group of batches and its checkpoint in the buffer.',
    labelNames: ['source'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [this.registry],
  });
  readonly commitLagSeconds = new client.Histogram({
    name: 'philotes_commit_lag_seconds',
    help: 'From source commit to buffer commit, for the last transaction of each buffer commit.',
    labelNames: ['source'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
    registers: [this.registry],
  });
  readonly checkpointLsn = new client.Gauge({
    name: 'philotes_checkpoint_lsn_bytes',
    help: 'LSN (as a byte position) of the checkpoint stored in the buffer.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly confirmedLsn = new client.Gauge({
    name: 'philotes_confirmed_lsn_bytes',
    help: 'LSN (as a byte position) last confirmed to the source slot.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly serverWalEnd = new client.Gauge({
    name: 'philotes_source_wal_end_lsn_bytes',
    help: 'Latest WAL end reported by the source server on the replication stream.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly lagBytes = new client.Gauge({
    name: 'philotes_replication_lag_bytes',
    help: 'Source WAL end minus the stored checkpoint: WAL not yet captured.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly lastCommitTimestamp = new client.Gauge({
    name: 'philotes_last_source_commit_timestamp_seconds',
    help: 'Source commit time of the last transaction stored in the buffer.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly readerUp = new client.Gauge({
    name: 'philotes_reader_up',
    help: '1 while the source reader is streaming, 0 otherwise.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly readerRestarts = new client.Counter({
    name: 'philotes_reader_restarts_total',
    help: 'Times a source reader was restarted after a failure.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly readerFailures = new client.Counter({
    name: 'philotes_reader_failures_total',
    help: 'Reader failures by kind: retryable (will restart) or fatal (source stopped).',
    labelNames: ['source', 'kind'] as const,
    registers: [this.registry],
  });
  readonly snapshots = new client.Counter({
    name: 'philotes_snapshots_total',
    help: 'Snapshots begun, by reason: initial (a new source), when_needed (after lost changes), on_demand.',
    labelNames: ['source', 'reason'] as const,
    registers: [this.registry],
  });
  readonly snapshotRows = new client.Counter({
    name: 'philotes_snapshot_rows_total',
    help: 'Rows stored by snapshots as SNAPSHOT events.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly snapshotTables = new client.Gauge({
    name: 'philotes_snapshot_tables',
    help: "Tables of the source's current (or last) snapshot by state: pending, running, done, skipped_no_key, not_published (0 while none ran in this process).",
    labelNames: ['source', 'state'] as const,
    registers: [this.registry],
  });
  readonly gaps = new client.Counter({
    name: 'philotes_gaps_recorded_total',
    help: 'Gaps recorded in cdc_gaps by this process (snapshot: when_needed recovering from lost changes), by reason.',
    labelNames: ['source', 'reason'] as const,
    registers: [this.registry],
  });
  readonly sourceDiverged = new client.Gauge({
    name: 'philotes_source_diverged',
    help: 'Is 1 while the source is stopped because its server is not the history the buffer holds (SOURCE_DIVERGED, SOURCE_REPLACED: restored, failed over, replaced); reset-source records the truth.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly queuedBatches = new client.Gauge({
    name: 'philotes_queued_batches',
    help: 'Batches received from a reader and waiting to be stored.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });

  readonly sourceState = new client.Gauge({
    name: 'philotes_source_state',
    help: 'Is 1 for the state the source is in: starting, streaming, backoff, stopping, stopped or failed.',
    labelNames: ['source', 'state'] as const,
    registers: [this.registry],
  });
  readonly consecutiveFailures = new client.Gauge({
    name: 'philotes_reader_consecutive_failures',
    help: 'Failed attempts since the source last streamed.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly nextAttemptTimestamp = new client.Gauge({
    name: 'philotes_reader_next_attempt_timestamp_seconds',
    help: 'When the next attempt to start the reader is due; 0 when none is pending.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly slotRetainedWal = new client.Gauge({
    name: 'philotes_slot_retained_wal_bytes',
    help: "WAL the source keeps for the source's slot: its WAL position minus the slot's restart_lsn (polled every 15 s while the reader runs).",
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly slotSafeWalSize = new client.Gauge({
    name: 'philotes_slot_safe_wal_size_bytes',
    help: 'WAL the slot may still hold before max_slot_wal_keep_size invalidates it (PostgreSQL 13+; absent when there is no limit).',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly slotWalStatus = new client.Gauge({
    name: 'philotes_slot_wal_status',
    help: "Is 1 for the slot's wal_status: reserved, extended, unreserved (about to lose WAL) or lost (invalidated).",
    labelNames: ['source', 'status'] as const,
    registers: [this.registry],
  });
  readonly slotSpilledTransactions = new client.Gauge({
    name: 'philotes_slot_spilled_transactions',
    help: "Transactions the source's decoding spilled to its disk for the slot because they outgrew logical_decoding_work_mem (pg_stat_replication_slots.spill_txns, a server counter; PostgreSQL 14+).",
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly slotSpilledBytes = new client.Gauge({
    name: 'philotes_slot_spilled_bytes',
    help: "Bytes the source's decoding spilled to its disk for the slot (pg_stat_replication_slots.spill_bytes; PostgreSQL 14+).",
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly slotStreamedTransactions = new client.Gauge({
    name: 'philotes_slot_streamed_transactions',
    help: 'Transactions the source streamed to Philotes while in progress instead of spilling them (pg_stat_replication_slots.stream_txns; protocol 2, PostgreSQL 14+).',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly slotStreamedBytes = new client.Gauge({
    name: 'philotes_slot_streamed_bytes',
    help: 'Bytes of in-progress transactions the source streamed to Philotes (pg_stat_replication_slots.stream_bytes; PostgreSQL 14+).',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly buildInfo = new client.Gauge({
    name: 'philotes_build_info',
    help: 'Always 1; the labels say which Philotes and Node.js run.',
    labelNames: ['version', 'node'] as const,
    registers: [this.registry],
  });
  readonly lastErrorTimestamp = new client.Gauge({
    name: 'philotes_reader_last_error_timestamp_seconds',
    help: 'When the source last failed (its message is lastError on /readyz); 0 if it never did.',
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly bufferTransactions = new client.Counter({
    name: 'philotes_buffer_transactions_total',
    help: 'Buffer transactions committed, all sources together (one may store several sources: coalesced commits).',
    registers: [this.registry],
  });
  readonly bufferTransactionSources = new client.Histogram({
    name: 'philotes_buffer_transaction_sources',
    help: 'How many sources one committed buffer transaction stored.',
    buckets: [1, 2, 4, 8, 16, 32, 64],
    registers: [this.registry],
  });
  readonly bytesInFlight = new client.Gauge({
    name: 'philotes_in_flight_bytes',
    help: 'Bytes of batches received from readers and not yet stored, all sources together.',
    registers: [this.registry],
  });
  readonly readersHeld = new client.Gauge({
    name: 'philotes_readers_held',
    help: 'Is 1 while every reader holds because the bytes in flight passed PHILOTES_MAX_BYTES_IN_FLIGHT.',
    registers: [this.registry],
  });
  readonly sourcesOwned = new client.Gauge({
    name: 'philotes_sources_owned',
    help: 'Sources whose lease this process holds (it captures them).',
    registers: [this.registry],
  });
  readonly sourceOwned = new client.Gauge({
    name: 'philotes_source_owned',
    help: "Is 1 while this process holds the source's lease; the fleet owns a source when one replica says 1 (alert PhilotesSourceUnowned).",
    labelNames: ['source'] as const,
    registers: [this.registry],
  });
  readonly fleetMembers = new client.Gauge({
    name: 'philotes_fleet_members',
    help: 'Live Philotes processes capturing into this buffer, this one included, as its last lease renewal saw them.',
    registers: [this.registry],
  });
  readonly leaseChanges = new client.Counter({
    name: 'philotes_lease_changes_total',
    help: 'Changes of the leases this process holds: acquired (free), taken_over (from a member that let it expire), released, expired (given up: not renewed in time, or found gone), fenced (a store refused).',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  /** What the lease keeper reports. */
  readonly leaseObserver: LeaseObserver = {
    change: (reason, sourceId, owned) => {
      this.leaseChanges.inc({ reason });
      if (owned !== null) {
        this.sourceOwned.set({ source: sourceId }, owned.includes(sourceId) ? 1 : 0);
        this.sourcesOwned.set(owned.length);
      }
    },
    members: (live) => this.fleetMembers.set(live),
  };

  readonly consumerLagEvents = new client.Gauge({
    name: 'philotes_consumer_lag_events',
    help: `Events of the source stored (and readable) after the consumer group's position (counted up to ${LAG_COUNT_CAP}).`,
    labelNames: ['group', 'source'] as const,
    registers: [this.registry],
  });
  readonly consumerLagSeconds = new client.Gauge({
    name: 'philotes_consumer_lag_seconds',
    help: "How long the group's oldest unread event of the source has been in the buffer (0: it has read everything).",
    labelNames: ['group', 'source'] as const,
    registers: [this.registry],
  });
  readonly consumerLagBytes = new client.Gauge({
    name: 'philotes_consumer_lag_bytes',
    help: "WAL bytes between the group's position and the source's checkpoint.",
    labelNames: ['group', 'source'] as const,
    registers: [this.registry],
  });
  readonly consumerExpired = new client.Gauge({
    name: 'philotes_consumer_expired',
    help: 'Is 1 for a consumer group retention expired (retentionMax dropped events it had not read): it reads nothing more.',
    labelNames: ['group'] as const,
    registers: [this.registry],
  });
  readonly bufferPartitions = new client.Gauge({
    name: 'philotes_buffer_partitions',
    help: 'Partitions of cdc_events (1 while it is not partitioned yet).',
    registers: [this.registry],
  });
  readonly bufferSizeBytes = new client.Gauge({
    name: 'philotes_buffer_bytes',
    help: 'Bytes of cdc_events on disk, its indexes and TOAST included.',
    registers: [this.registry],
  });
  readonly bufferOldestSeconds = new client.Gauge({
    name: 'philotes_buffer_oldest_event_age_seconds',
    help: 'Age of the oldest event the buffer still holds (about: the first rows of the oldest partition).',
    registers: [this.registry],
  });
  readonly retentionSeconds = new client.Gauge({
    name: 'philotes_retention_seconds',
    help: 'The retention setting: partitions older than this are dropped once every group has read them (0: never).',
    registers: [this.registry],
  });
  readonly retentionMaxSeconds = new client.Gauge({
    name: 'philotes_retention_max_seconds',
    help: 'The retentionMax setting: partitions older than this are dropped anyway, the groups behind expired (0: never).',
    registers: [this.registry],
  });
  readonly retentionDropped = new client.Counter({
    name: 'philotes_retention_dropped_total',
    help: 'Partitions of cdc_events retention dropped (by this process).',
    registers: [this.registry],
  });
  readonly retentionDroppedEvents = new client.Counter({
    name: 'philotes_retention_dropped_events_total',
    help: 'Events in the partitions retention dropped (about: the planner estimate of each).',
    registers: [this.registry],
  });

  /** What the buffer keeper sees each round (src/supervisor/buffer-keeper.ts). */
  readonly bufferKeeperObserver: BufferKeeperObserver = {
    size: (size) => {
      this.bufferPartitions.set(size.partitions);
      this.bufferSizeBytes.set(size.bytes);
      this.bufferOldestSeconds.set(
        size.oldestStoredAt === null
          ? 0
          : Math.max(0, (Date.now() - size.oldestStoredAt.getTime()) / 1000),
      );
    },
    consumers: (lag) => {
      this.consumerLagEvents.reset();
      this.consumerLagSeconds.reset();
      this.consumerLagBytes.reset();
      this.consumerExpired.reset();
      for (const l of lag) {
        const labels = { group: l.group, source: l.source };
        this.consumerLagEvents.set(labels, l.lagEvents);
        this.consumerLagSeconds.set(labels, l.lagSeconds);
        this.consumerLagBytes.set(labels, l.lagBytes);
        this.consumerExpired.set({ group: l.group }, l.expired ? 1 : 0);
      }
    },
    dropped: (_partition, events) => {
      this.retentionDropped.inc();
      this.retentionDroppedEvents.inc(events);
    },
    expired: () => undefined,
  };

  /** What the batch writer reports, into the process-wide families. */
  readonly writerObserver: BatchWriterObserver = {
    transaction: (sources) => {
      this.bufferTransactions.inc();
      this.bufferTransactionSources.observe(sources);
    },
    inFlight: (bytes, holding) => {
      this.bytesInFlight.set(bytes);
      this.readersHeld.set(holding ? 1 : 0);
    },
  };
  private readiness: () => ReadonlyArray<{ source: string; ready: boolean; notStreaming: number }> =
    () => [];
  readonly sourceReady = new client.Gauge({
    name: 'philotes_source_ready',
    help: 'Is 1 while the source streams or has stopped streaming for less than the readiness grace period (what /readyz reports).',
    labelNames: ['source'] as const,
    registers: [this.registry],
    collect: () => {
      for (const r of this.readiness()) this.sourceReady.set({ source: r.source }, r.ready ? 1 : 0);
    },
  });
  readonly notStreamingSeconds = new client.Gauge({
    name: 'philotes_source_not_streaming_seconds',
    help: 'How long the source has not been capturing: since its first failure after it last streamed steadily (0 while it does), however many restarts it made meanwhile.',
    labelNames: ['source'] as const,
    registers: [this.registry],
    collect: () => {
      for (const r of this.readiness())
        this.notStreamingSeconds.set({ source: r.source }, r.notStreaming);
    },
  });

  private bufferUpNow: () => boolean | null = () => null;
  readonly bufferUp = new client.Gauge({
    name: 'philotes_buffer_up',
    help: 'Is 1 while connections to the buffer database succeed, 0 once the last one failed (what /readyz reports as buffer.state); absent before the buffer was first reached.',
    registers: [this.registry],
    collect: () => {
      const up = this.bufferUpNow();
      if (up === null) this.bufferUp.reset();
      else this.bufferUp.set(up ? 1 : 0);
    },
  });

  /** Where philotes_buffer_up reads from at each scrape (null: not opened yet). */
  watchBuffer(up: () => boolean | null): void {
    this.bufferUpNow = up;
  }

  /** Where the readiness gauges read from at each scrape. */
  watchReadiness(
    reports: () => ReadonlyArray<{ source: string; ready: boolean; notStreaming: number }>,
  ): void {
    this.readiness = reports;
  }

  constructor(version = 'unknown') {
    client.collectDefaultMetrics({ register: this.registry });
    this.buildInfo.set({ version, node: process.version }, 1);
    for (const reason of LEASE_CHANGES) this.leaseChanges.inc({ reason }, 0);
    this.sourcesOwned.set(0);
    this.fleetMembers.set(1);
  }

  /** The slot's WAL retention as last polled from the source. */
  recordSlot(source: string, slot: SlotStatusMessage): void {
    if (slot.retainedWalBytes !== null) this.slotRetainedWal.set({ source }, slot.retainedWalBytes);
    if (slot.safeWalSizeBytes === null) this.slotSafeWalSize.remove({ source });
    else this.slotSafeWalSize.set({ source }, slot.safeWalSizeBytes);
    if (slot.walStatus !== null) {
      for (const status of WAL_STATUSES)
        this.slotWalStatus.set({ source, status }, status === slot.walStatus ? 1 : 0);
    }
    if (slot.decoding !== null) {
      this.slotSpilledTransactions.set({ source }, slot.decoding.spillTxns);
      this.slotSpilledBytes.set({ source }, slot.decoding.spillBytes);
      this.slotStreamedTransactions.set({ source }, slot.decoding.streamTxns);
      this.slotStreamedBytes.set({ source }, slot.decoding.streamBytes);
    }
  }

  /** Counts a committed buffer transaction: its batches, events, bytes, duration and lag. */
  recordStored(source: string, report: StoredGroupReport): void {
    const labels = { source };
    this.bufferCommitSeconds.observe(labels, report.durationMs / 1000);
    this.bufferCommits.inc(labels);
    this.batches.inc(labels, report.batches.length);
    this.bufferBytes.inc(labels, report.bytes);
    for (const batch of report.batches) {
      this.events.inc({ source, operation: 'INSERT' }, batch.counts.insert);
      this.events.inc({ source, operation: 'UPDATE' }, batch.counts.update);
      this.events.inc({ source, operation: 'DELETE' }, batch.counts.delete);
      this.events.inc({ source, operation: 'TRUNCATE' }, batch.counts.truncate);
      if (batch.counts.message > 0)
        this.events.inc({ source, operation: 'MESSAGE' }, batch.counts.message);
      if (batch.counts.ddl > 0) this.events.inc({ source, operation: 'DDL' }, batch.counts.ddl);
      if (batch.counts.snapshot > 0) {
        this.events.inc({ source, operation: 'SNAPSHOT' }, batch.counts.snapshot);
        this.snapshotRows.inc(labels, batch.counts.snapshot);
      }
      this.transactions.inc(labels, batch.transactions);
    }
    const lastCommit = [...report.batches].reverse().find((b) => b.checkpointCommitTimeMs !== null);
    if (lastCommit?.checkpointCommitTimeMs != null) {
      this.lastCommitTimestamp.set(labels, lastCommit.checkpointCommitTimeMs / 1000);
      this.commitLagSeconds.observe(
        labels,
        Math.max(0, report.storedAt - lastCommit.checkpointCommitTimeMs) / 1000,
      );
    }
  }

  /** Drops every series of a source that is no longer configured (a reload removed it). */
  removeSource(source: string): void {
    for (const metric of [
      this.transactions,
      this.batches,
      this.bufferBytes,
      this.bufferCommits,
      this.bufferCommitSeconds,
      this.commitLagSeconds,
      this.checkpointLsn,
      this.confirmedLsn,
      this.serverWalEnd,
      this.lagBytes,
      this.lastCommitTimestamp,
      this.readerUp,
      this.readerRestarts,
      this.queuedBatches,
      this.consecutiveFailures,
      this.nextAttemptTimestamp,
      this.lastErrorTimestamp,
      this.slotRetainedWal,
      this.slotSafeWalSize,
      this.slotSpilledTransactions,
      this.slotSpilledBytes,
      this.slotStreamedTransactions,
      this.slotStreamedBytes,
      this.sourceReady,
      this.notStreamingSeconds,
      this.snapshotRows,
      this.sourceDiverged,
    ]) {
      metric.remove({ source });
    }
    for (const reason of SNAPSHOT_REASONS) this.snapshots.remove({ source, reason });
    for (const state of SNAPSHOT_TABLE_STATES) this.snapshotTables.remove({ source, state });
    for (const reason of GAP_REASONS) this.gaps.remove({ source, reason });
    for (const operation of OPERATIONS) this.events.remove({ source, operation });
    for (const kind of ['retryable', 'fatal']) this.readerFailures.remove({ source, kind });
    for (const state of SOURCE_STATES) this.sourceState.remove({ source, state });
    for (const status of WAL_STATUSES) this.slotWalStatus.remove({ source, status });
  }

  /** Creates every per-source series at zero so dashboards and rates start from a value. */
  initSource(source: string): void {
    for (const operation of OPERATIONS) this.events.inc({ source, operation }, 0);
    this.sourceOwned.set({ source }, 0);
    this.transactions.inc({ source }, 0);
    this.snapshotRows.inc({ source }, 0);
    for (const state of SNAPSHOT_TABLE_STATES) this.snapshotTables.set({ source, state }, 0);
    for (const reason of SNAPSHOT_REASONS) this.snapshots.inc({ source, reason }, 0);
    for (const reason of GAP_REASONS) this.gaps.inc({ source, reason }, 0);
    this.batches.inc({ source }, 0);
    this.bufferBytes.inc({ source }, 0);
    this.bufferCommits.inc({ source }, 0);
    this.readerRestarts.inc({ source }, 0);
    this.readerFailures.inc({ source, kind: 'retryable' }, 0);
    this.readerFailures.inc({ source, kind: 'fatal' }, 0);
    this.readerUp.set({ source }, 0);
    this.queuedBatches.set({ source }, 0);
    this.sourceDiverged.set({ source }, 0);
    for (const state of SOURCE_STATES) this.sourceState.set({ source, state }, 0);
    this.consecutiveFailures.set({ source }, 0);
    this.nextAttemptTimestamp.set({ source }, 0);
    this.lastErrorTimestamp.set({ source }, 0);
  }
}
