/**
 * Everything the reader asks of its source, behind two interfaces: the ordinary connection
 * (`SourceSession`: preparing the slot and publication, catalog lookups, the slot's state, the
 * DDL trigger) and the replication connection (`ReplicationConnection`). `ReaderConnections`
 * makes both. The reader gets them from a factory so that its flow — stream order, blocking,
 * batching, confirmations — can be driven in a unit test with recorded pgoutput messages and no
 * server (test/unit/reader-flow.test.ts); `pgConnections` is the real one.
 */
import pg from 'pg';
import type { SourceConfig } from '../src/common/config.js';
import { DATABASE_IDENTITY_SQL, type DatabaseIdentity } from '../src/common/database-identity.js';
import { readDdlTriggerState, type DdlTriggerState } from '../src/common/ddl-capture.js';
import { describeConnectionError } from '../src/common/errors.js';
import type { Logger } from '../src/common/logger.js';
import { pgClientOptions } from '../src/common/pg-connection.js';
import type { SlotDecodingStats } from '../src/common/protocol.js';
import {
  currentWalLsn,
  readSlotDecodingStats,
  readSlotState,
  takeOverSlot,
  type SlotState,
  type SlotTakeover,
} from '../src/common/source-admin.js';
import { readNextXid } from '../src/common/source-history.js';
import type { ResolvedRelation } from './decode/event-rows.js';
import {
  dropClientSocket,
  REPLICATION_SESSION_OPTIONS,
  ReplicationStream,
  type PgoutputOptions,
  type StreamEvents,
} from './replication-stream.js';
import { CatalogResolver, type StreamRelation } from './catalog-resolver.js';
import { prepareSource, type BufferRecord, type PreparedSource } from './source-setup.js';

/** What the stream does not carry about a table, looked up on the source (catalog-resolver.ts). */
export interface RelationCatalog {
  /** A Type message: the name of a non-built-in type at this point of the WAL. */
  noteType(typeOid: number, name: string): void;
  /** A Relation message's shape, with value types and the primary key. */
  resolveRelation(relation: StreamRelation): Promise<ResolvedRelation>;
  /** A table as the catalog describes it now, in the shape a Relation message would give. */
  resolveCatalogRelation(oid: number, schema: string, table: string): Promise<ResolvedRelation>;
}

/** The reader's ordinary connection to its source. One query at a time (a pg client's rule). */
export interface SourceSession {
  readonly catalog: RelationCatalog;
  /** Preflight checks, the publication and the slot, compared with what the buffer holds. */
  prepare(record: BufferRecord | null): Promise<PreparedSource>;
  /** Which database of which running server this is (compared with the buffer's). */
  databaseIdentity(): Promise<string | null>;
  slotState(): Promise<SlotState | null>;
  /** Frees the slot from a stale Philotes walsender, if one streams it (source-admin.ts). */
  takeOverSlot(): Promise<SlotTakeover | null>;
  /** The slot's confirmed_flush_lsn as the server has it now. */
  slotConfirmedFlush(): Promise<string | null>;
  slotDecodingStats(): Promise<SlotDecodingStats | null>;
  currentWal(): Promise<bigint>;
  nextXid(serverVersion: number): Promise<bigint>;
  ddlTriggerState(): Promise<DdlTriggerState>;
  /** Ends the connection politely (may wait for the server). */
  end(): Promise<void>;
  /** Drops the socket at once: for a peer that never answers the goodbye. */
  drop(): void;
}

/** The replication connection, as the reader uses it (replication-stream.ts). */
export interface ReplicationConnection {
  /** START_REPLICATION; settles when the stream ends or fails. */
  start(slot: string, lsn: bigint): Promise<unknown>;
  /** A standby status update: written, flushed and applied up to `lsn`. */
  acknowledge(lsn: bigint, ping: boolean): Promise<unknown>;
  pause(): void;
  resume(): void;
  destroy(): Promise<unknown>;
  dropSocket(): void;
}

export interface ReaderConnections {
  /** Connects the ordinary connection; `onError` gets its errors after connecting. */
  openSession(log: Logger, onError: (error: unknown) => void): Promise<SourceSession>;
  openStream(
    publication: string,
    events: StreamEvents,
    options: PgoutputOptions,
  ): ReplicationConnection;
  /** Options for the snapshot's own connections (its watermarks and chunk reads). */
  snapshotConnection(): pg.ClientConfig;
}

class PgSourceSession implements SourceSession {
  readonly catalog: CatalogResolver;

  constructor(
    private readonly client: pg.Client,
    private readonly options: pg.ClientConfig,
    private readonly source: SourceConfig,
    private readonly log: Logger,
  ) {
    this.catalog = new CatalogResolver(client, log);
  }

  prepare(record: BufferRecord | null): Promise<PreparedSource> {
    return prepareSource(this.client, this.options, this.source, this.log, record);
  }

  async databaseIdentity(): Promise<string | null> {
    const result = await this.client.query<DatabaseIdentity>(DATABASE_IDENTITY_SQL);
    return result.rows[0]?.identity ?? null;
  }

  slotState(): Promise<SlotState | null> {
    return readSlotState(this.client, this.source.slot);
  }

  takeOverSlot(): Promise<SlotTakeover | null> {
    return takeOverSlot(this.client, this.source.slot);
  }

  async slotConfirmedFlush(): Promise<string | null> {
    const result = await this.client.query<{ lsn: string | null }>(
      'SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1',
      [this.source.slot],
    );
    return result.rows[0]?.lsn ?? null;
  }

  slotDecodingStats(): Promise<SlotDecodingStats | null> {
    return readSlotDecodingStats(this.client, this.source.slot);
  }

  currentWal(): Promise<bigint> {
    return currentWalLsn(this.client);
  }

  nextXid(serverVersion: number): Promise<bigint> {
    return readNextXid(this.client, serverVersion);
  }

  ddlTriggerState(): Promise<DdlTriggerState> {
    return readDdlTriggerState(this.client);
  }

  end(): Promise<void> {
    return this.client.end();
  }

  drop(): void {
    dropClientSocket(this.client);
  }
}

/** The real connections: pg clients to the source of `source`. */
export function pgConnections(source: SourceConfig): ReaderConnections {
  const options = pgClientOptions(source.connection, `philotes:${source.id}`);
  return {
    async openSession(log, onError) {
      const client = new pg.Client(options);
      client.on('error', onError);
      const { host, port } = source.connection;
      await client.connect().catch((error: unknown) => {
        // A failed connect leaves nothing open, but the client's socket may still be there.
        dropClientSocket(client);
        return Promise.reject(describeConnectionError(error, 'source', host, port));
      });
      return new PgSourceSession(client, options, source, log);
    },
    openStream: (publication, events, streamOptions) =>
      new ReplicationStream(options, publication, events, streamOptions),
    // Watermarks carry no data: their commits need not wait for synchronous standbys (a slow or
    // missing one would stall the copy, not protect anything).
    snapshotConnection: () => ({
      ...options,
      options: `${REPLICATION_SESSION_OPTIONS} -c synchronous_commit=local`,
    }),
  };
}
