/**
 * What each PostgreSQL version can do, by `server_version_num`, in one table: every version test
 * in Philotes names a feature here instead of comparing numbers, so a newcomer finds why a
 * version matters in one place. A leaf module: both sides import it.
 */
export const SERVER_FEATURES = {
  /** pgoutput itself, and so logical replication from this server at all. */
  pgoutput: { since: 100000, what: 'pgoutput' },
  /** publish_via_partition_root on a publication. */
  publishViaPartitionRoot: { since: 130000, what: 'publish_via_partition_root' },
  /** pg_current_snapshot() and the xid8 functions (before: txid_current_snapshot()). */
  xid8Snapshots: { since: 130000, what: 'pg_current_snapshot()' },
  /** gen_random_uuid() without an extension: the buffer's schema uses it. */
  genRandomUuid: { since: 130000, what: 'gen_random_uuid()' },
  /** Logical messages through pgoutput (the `messages` option): watermarks, DDL, messages. */
  logicalMessages: { since: 140000, what: 'logical messages in pgoutput' },
  /** pgoutput protocol 2: large in-progress transactions streamed as they are decoded. */
  streamingProtocol: { since: 140000, what: 'pgoutput protocol 2' },
  /** wal_sender_timeout set by the replication connection itself (before: server-wide only). */
  walSenderTimeoutPerSession: { since: 120000, what: 'wal_sender_timeout per connection' },
  /** Failover slots: created with FAILOVER, kept by a standby with sync_replication_slots. */
  failoverSlots: { since: 170000, what: 'failover slots' },
  /** pg_stat_replication_slots (spill and stream counters). */
  slotStatistics: { since: 140000, what: 'pg_stat_replication_slots' },
} as const;

export type ServerFeature = keyof typeof SERVER_FEATURES;

/** Whether a server of `serverVersion` (server_version_num) has `feature`. */
export function supports(serverVersion: number, feature: ServerFeature): boolean {
  return serverVersion >= SERVER_FEATURES[feature].since;
}

/** The first major version with `feature`, for messages ("version 14 or later"). */
export function sinceMajor(feature: ServerFeature): number {
  return Math.floor(SERVER_FEATURES[feature].since / 10000);
}
