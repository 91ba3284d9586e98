/**
 * The chunk query: the next `limit` rows of a table after `after` in primary key order, every
 * column as the text its output function prints (what pgoutput sends), in the order of the
 * table's columns (the stream's Relation order). A row comparison on the key — `(a, b) > ($1, $2)` — walks
 * a composite key in index order, and each query is short: read-only, one index range.
 */

export interface ChunkTable {
  readonly schema: string;
  readonly table: string;
  /** Columns in attnum order, as the stream's Relation message lists them. */
  readonly columns: readonly string[];
  readonly primaryKey: readonly string[];
  /** The key columns' types as format_type prints them (SQL, quoted where needed). */
  readonly primaryKeyTypes: readonly string[];
}

function ident(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

export function chunkQuery(
  t: ChunkTable,
  after: readonly string[] | null,
  limit: number,
): { text: string; values: unknown[] } {
  if (t.primaryKey.length === 0)
    throw new Error(`snapshot: ${t.schema}.${t.table} has no primary key`);
  // Qualified: a bare name in ORDER BY means an output column first, and the output columns
  // are the texts (ORDER BY "n" would sort 106 before 22).
  const key = t.primaryKey.map((c) => `t.${ident(c)}`);
  const select = t.columns.map((c) => `t.${ident(c)}::text`).join(', ');
  const from = `${ident(t.schema)}.${ident(t.table)} AS t`;
  // The key columns compared in their own types: the text of the last key cast back.
  const where =
    after === null
      ? ''
      : `WHERE (${key.join(', ')}) > (${after
          .map((_, i) => `$${i + 1}::text::${t.primaryKeyTypes[i]!}`)
          .join(', ')})`;
  return {
    text: `SELECT ${select} FROM ${from} ${where} ORDER BY ${key.join(', ')} LIMIT ${Math.floor(limit)}`,
    values: after === null ? [] : [...after],
  };
}

/**
 * The rows of chosen keys (each key its columns' texts), as chunkQuery prints them: the rows a
 * window must read again (see SnapshotWindow.reread). One array parameter per key column, so the
 * number of keys is not bounded by the protocol's parameter limit.
 */
export function rereadQuery(
  t: ChunkTable,
  keys: ReadonlyArray<readonly string[]>,
): { text: string; values: unknown[] } {
  const key = t.primaryKey.map((c) => `t.${ident(c)}`);
  const select = t.columns.map((c) => `t.${ident(c)}::text`).join(', ');
  const from = `${ident(t.schema)}.${ident(t.table)} AS t`;
  const names = t.primaryKey.map((_, i) => `k${i}`);
  const cast = names.map((n, i) => `u.${n}::${t.primaryKeyTypes[i]!}`).join(', ');
  const arrays = names.map((_, i) => `$${i + 1}::text[]`).join(', ');
  return {
    text: `SELECT ${select} FROM ${from} WHERE (${key.join(', ')}) IN (SELECT ${cast} FROM unnest(${arrays}) AS u(${names.join(', ')})) ORDER BY ${key.join(', ')}`,
    values: t.primaryKey.map((_, i) => keys.map((k) => k[i]!)),
  };
}
