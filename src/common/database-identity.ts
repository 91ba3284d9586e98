/**
 * Tells whether two connections reach the same database: the server's start time and the
 * database's oid and name together identify one database of one running server.
 */
export const DATABASE_IDENTITY_SQL = `
  SELECT pg_postmaster_start_time()::text || '/' || d.oid || '/' || d.datname AS identity,
         current_schema() AS schema
    FROM pg_database d WHERE d.datname = current_database()`;

export interface DatabaseIdentity {
  readonly identity: string;
  /** Where unqualified tables are created: the buffer's tables live here. */
  readonly schema: string;
}

/** Philotes' own tables in the buffer. */
export const BUFFER_TABLES = [
  'cdc_events',
  'cdc_checkpoints',
  'cdc_schema_history',
  'cdc_gaps',
  'cdc_staged',
  'cdc_snapshots',
  'cdc_snapshot_tables',
  'cdc_retracted_events',
  'cdc_source_status',
  'cdc_members',
  'cdc_leases',
  'cdc_lease_history',
  'cdc_consumers',
  'cdc_consumer_offsets',
  'cdc_consumer_retractions',
  'cdc_partitions',
  'philotes_migrations',
];
