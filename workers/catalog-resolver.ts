/**
 * The catalog lookups the stream does not carry: a type's kind (enums, domains, arrays of them,
 * extension types), the primary key's column order, the primary key under a non-default replica
 * identity, and a table's shape for a snapshot of a table the stream has not described yet. The
 * stream is the truth about a table at each point of the WAL; this adds only what agrees with it.
 */
import type pg from 'pg';
import type { Logger } from '../src/common/logger.js';
import type { ResolvedColumn, ResolvedRelation } from './decode/event-rows.js';
import type { RelationColumn } from './decode/pgoutput.js';
import {
  BUILTIN_TYPES,
  moneyType,
  TEXT_TYPE,
  type TypeInfo,
  type ValueKind,
} from './decode/values.js';

interface TypeRow {
  oid: number;
  typname: string;
  typtype: string;
  typcategory: string;
  typelem: number;
  typdelim: string;
  typbasetype: number;
}

/** What a Relation message says about a table: its shape at that point of the WAL. */
export interface StreamRelation {
  readonly relationOid: number;
  readonly schema: string;
  readonly name: string;
  /** pg_class.relreplident as it was: 'd' default (primary key), 'f' full, 'i' index, 'n' nothing. */
  readonly replicaIdentity: string;
  readonly columns: readonly RelationColumn[];
}

/**
 * Resolves relation columns to value types and primary keys. Built-in types need no query;
 * others (enums, domains, arrays of them, extension types) are looked up once and cached.
 *
 * The stream is the truth about a table at each point of the WAL; the catalog describes it as
 * it is now, which differs whenever the reader is behind a DDL (stopped, restarting, lagging).
 * So shape, names and key flags come from the Relation message, type names from the Type
 * messages the stream sends with it, and the catalog only adds what the stream does not carry
 * (a type's kind, the primary key's column order, the primary key under a non-default replica
 * identity) and only where it agrees with the stream.
 */
export class CatalogResolver {
  private readonly types = new Map<number, TypeInfo>(BUILTIN_TYPES);
  /** Type names as the stream's Type messages gave them (they may have been renamed since). */
  private readonly streamTypeNames = new Map<number, string>();
  private moneyChecked = false;

  constructor(
    private readonly client: pg.Client,
    private readonly log?: Logger,
  ) {}

  /** A Type message: the name of a non-built-in type at this point of the WAL. */
  noteType(typeOid: number, name: string): void {
    this.streamTypeNames.set(typeOid, name);
  }

  /**
   * How this source writes money: its lc_monetary decides the decimals (the walsender's session
   * has the same database and role defaults as this one). Asked once, before the first table is
   * resolved; a format it cannot read leaves money as the source's text.
   */
  private async loadMoneyFormat(): Promise<void> {
    if (this.moneyChecked) return;
    this.moneyChecked = true;
    const sample = await this.client.query<{ m: string }>(
      'SELECT (1234567)::numeric::money::text AS m',
    );
    const money = moneyType(sample.rows[0]?.m ?? '');
    if (money === null) {
      this.log?.warn(
        { sample: sample.rows[0]?.m },
        'unrecognised money format (lc_monetary): money values are stored as the text the source writes',
      );
      const text = { ...TEXT_TYPE, oid: 790, name: 'money' };
      this.types.set(790, text);
      this.types.set(791, { ...this.types.get(791)!, element: text });
      return;
    }
    this.types.set(790, money);
    this.types.set(791, { ...this.types.get(791)!, element: money });
  }

  /**
   * A table as the catalog describes it now, in the shape pgoutput's Relation message would give
   * (stored generated columns left out; the key flags as pgoutput sets them for the table's
   * replica identity: every column for FULL, the identity index's for USING INDEX, the primary
   * key's for DEFAULT): for a snapshot of a table the stream has not described yet. A shape that
   * differed from the stream's would make a spurious schema version when the stream's arrives.
   */
  async resolveCatalogRelation(
    oid: number,
    schema: string,
    name: string,
  ): Promise<ResolvedRelation> {
    const result = await this.client.query<{
      name: string;
      type_oid: number;
      type_mod: number;
      key: boolean;
      identity: string;
    }>(
      `SELECT a.attname AS name, a.atttypid::int AS type_oid, a.atttypmod AS type_mod,
              CASE c.relreplident
                WHEN 'f' THEN true
                WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid
                                         AND i.indisprimary AND a.attnum = ANY (i.indkey))
                WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid
                                         AND i.indisreplident AND a.attnum = ANY (i.indkey))
                ELSE false
              END AS key,
              c.relreplident::text AS identity
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = '' -- snapshots need PostgreSQL 14+
        ORDER BY a.attnum`,
      [oid],
    );
    return this.resolveRelation({
      relationOid: oid,
      schema,
      name,
      replicaIdentity: result.rows[0]?.identity ?? 'd',
      columns: result.rows.map((c) => ({
        flags: c.key ? 1 : 0,
        name: c.name,
        typeOid: c.type_oid,
        typeMod: c.type_mod,
      })),
    });
  }

  async resolveRelation(relation: StreamRelation): Promise<ResolvedRelation> {
    const { relationOid, schema, name: table, columns } = relation;
    // Once per reader, before any type is resolved: domains over money take it as their base.
    await this.loadMoneyFormat();
    await this.loadTypes(columns.map((c) => c.typeOid));
    const resolved: ResolvedColumn[] = columns.map((c) => {
      const type = this.types.get(c.typeOid) ?? {
        ...TEXT_TYPE,
        oid: c.typeOid,
        name: `oid:${c.typeOid}`,
        textForm: true,
      };
      const streamName = this.streamTypeNames.get(c.typeOid);
      return {
        name: c.name,
        type:
          streamName !== undefined && streamName !== type.name
            ? { ...type, name: streamName }
            : type,
        typeMod: c.typeMod,
        key: (c.flags & 1) !== 0,
      };
    });
    const pk = await this.client.query<{ attname: string }>(
      `SELECT a.attname
         FROM pg_index i
         JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = $1 AND i.indisprimary
        ORDER BY k.ord`,
      [relationOid],
    );
    const primaryKey = choosePrimaryKey(
      relation.replicaIdentity,
      resolved,
      pk.rows.map((r) => r.attname),
    );
    if (primaryKey.contradicted) {
      this.log?.info(
        {
          table: `${schema}.${table}`,
          catalogPrimaryKey: primaryKey.catalog,
          primaryKey: primaryKey.names,
        },
        'the primary key in the catalog today does not match this point of the stream (the table changed since); the key comes from the stream',
      );
    }
    return { oid: relationOid, schema, table, columns: resolved, primaryKey: primaryKey.names };
  }

  private async loadTypes(oids: readonly number[]): Promise<void> {
    let missing = [...new Set(oids.filter((oid) => !this.types.has(oid)))];
    const rows = new Map<number, TypeRow>();
    // Walk element and base types until everything referenced is known.
    while (missing.length > 0) {
      const result = await this.client.query<TypeRow>(
        `SELECT oid::int8 AS oid, typname, typtype, typcategory, typelem::int8 AS typelem, typdelim, typbasetype::int8 AS typbasetype
           FROM pg_type WHERE oid = ANY($1::oid[])`,
        [missing],
      );
      const next: number[] = [];
      for (const raw of result.rows) {
        const row = {
          ...raw,
          oid: Number(raw.oid),
          typelem: Number(raw.typelem),
          typbasetype: Number(raw.typbasetype),
        };
        rows.set(row.oid, row);
        for (const ref of [row.typelem, row.typbasetype]) {
          if (ref !== 0 && !this.types.has(ref) && !rows.has(ref)) next.push(ref);
        }
      }
      missing = [...new Set(next)];
    }
    const build = (oid: number, depth: number): TypeInfo => {
      const known = this.types.get(oid);
      if (known) return known;
      const row = rows.get(oid);
      if (!row || depth > 10) return { ...TEXT_TYPE, oid, name: `oid:${oid}`, textForm: true };
      let info: TypeInfo;
      if (row.typcategory === 'A' && row.typelem !== 0) {
        info = {
          oid,
          name: row.typname,
          kind: 'array',
          element: build(row.typelem, depth + 1),
          delimiter: row.typdelim,
        };
      } else if (row.typtype === 'd' && row.typbasetype !== 0) {
        // A domain keeps its base type's JSON form.
        const base = build(row.typbasetype, depth + 1);
        info = { ...base, oid, name: row.typname };
      } else {
        // Enums are strings by rule; anything else without a rule is its text output.
        info = {
          oid,
          name: row.typname,
          kind: 'string' as ValueKind,
          ...(row.typtype === 'e' ? {} : { textForm: true }),
        };
      }
      this.types.set(oid, info);
      return info;
    };
    for (const oid of rows.keys()) build(oid, 0);
  }
}

/**
 * The primary key of a relation at a point of the stream.
 *
 * Under the default replica identity the stream's key flags mark exactly the primary key's
 * columns as they were then: they are the truth, and the catalog only contributes the key's
 * column order, when it names the same columns. Under REPLICA IDENTITY FULL, USING INDEX or
 * NOTHING the stream does not say which columns form the primary key: the catalog's is taken when
 * every column it names is in the stream's column list, otherwise (a key column renamed or
 * dropped since) the replica identity columns stand in, as for a table without a primary key.
 */
export function choosePrimaryKey(
  replicaIdentity: string,
  columns: ReadonlyArray<{ readonly name: string; readonly key: boolean }>,
  catalogPrimaryKey: readonly string[],
): { names: string[]; catalog: string[]; contradicted: boolean } {
  const flagged = columns.filter((c) => c.key).map((c) => c.name);
  const catalog = [...catalogPrimaryKey];
  if (replicaIdentity === 'd') {
    const sameSet =
      catalog.length === flagged.length && catalog.every((name) => flagged.includes(name));
    return { names: sameSet ? catalog : flagged, catalog, contradicted: !sameSet };
  }
  const names = new Set(columns.map((c) => c.name));
  const fits = catalog.every((name) => names.has(name));
  if (catalog.length > 0 && fits) return { names: catalog, catalog, contradicted: false };
  return { names: flagged, catalog, contradicted: catalog.length > 0 };
}
