/**
 * The wire format of events between the threads and into the buffer: rows of cdc_events in
 * PostgreSQL's binary COPY format. The reader writes the rows; the buffer writer adds the header
 * and the trailer and names the columns. A leaf module, so that neither side imports the other.
 */

/** Column order of the COPY into cdc_events; the reader writes them in this order. */
export const EVENT_COPY_COLUMNS = [
  'source_id',
  'lsn',
  'seq',
  'xid',
  'committed_at',
  'schema_name',
  'table_name',
  'operation',
  'before',
  'after',
  'primary_key',
  'unchanged_columns',
  'details',
] as const;

/** 'PGCOPY\n\377\r\n\0', flags (int32 0), header extension length (int32 0). */
export const COPY_BINARY_HEADER = Buffer.from([
  0x50, 0x47, 0x43, 0x4f, 0x50, 0x59, 0x0a, 0xff, 0x0d, 0x0a, 0x00, 0, 0, 0, 0, 0, 0, 0, 0,
]);
export const COPY_BINARY_TRAILER = Buffer.from([0xff, 0xff]);
