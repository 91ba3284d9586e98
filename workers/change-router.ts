/**
 * Where each decoded pgoutput message goes, called by the decoder synchronously, per message,
 * in stream order: every change to the batch builder, and to the snapshot's stream side, which
 * notes what it touches; a table never captured (the buffer's own, when source and buffer
 * coincide) nowhere; a Relation message through the catalog (the one call that blocks the
 * stream, see SlotReader.block); logical messages by prefix (snapshot watermarks, DDL, the
 * configured ones).
 */
import type { SourceConfig } from '../src/common/config.js';
import { DDL_MESSAGE_PREFIX } from '../src/common/ddl-capture.js';
import type { BatchBuilder } from './decode/event-rows.js';
import {
  PG_EPOCH_OFFSET_US,
  type PgoutputHandler,
  type PgoutputMessage,
  type TupleView,
} from './decode/pgoutput.js';
import type { SnapshotStreamSide } from './snapshot/stream-side.js';
import { WATERMARK_PREFIX } from './snapshot/window.js';
import type { RelationCatalog } from './source-session.js';

export interface ChangeRouterOptions {
  readonly builder: BatchBuilder;
  readonly snapshots: SnapshotStreamSide;
  readonly catalog: RelationCatalog;
  readonly source: Pick<SourceConfig, 'ddl' | 'messages'>;
  /** 'schema.table' of tables never captured. */
  readonly skippedTables: ReadonlySet<string>;
  /** Pauses the stream until `work` is done (the messages behind wait in order). */
  block(work: () => Promise<void>): void;
}

export class ChangeRouter implements PgoutputHandler {
  private readonly builder: BatchBuilder;
  private readonly snapshots: SnapshotStreamSide;
  private readonly skippedRelations = new Set<number>();
  private readonly messagePrefixes: ReadonlySet<string>;

  constructor(private readonly o: ChangeRouterOptions) {
    this.builder = o.builder;
    this.snapshots = o.snapshots;
    this.messagePrefixes = new Set(o.source.messages);
  }

  begin(finalLsn: number, commitTime: number, xid: number): void {
    this.builder.begin(finalLsn, commitTime, xid);
  }

  commit(_commitLsn: number, endLsn: number, commitTime: number): void {
    this.builder.commit(endLsn, commitTime);
  }

  // Streamed in-progress transactions (protocol 2): staged until their commit, see BatchBuilder.

  streamStart(xid: number): void {
    this.snapshots.streamStart(xid);
    this.builder.streamStart(xid);
  }

  streamChange(xid: number): void {
    this.builder.streamChange(xid);
  }

  streamStop(): void {
    this.snapshots.streamStop();
    this.builder.streamStop();
  }

  streamCommit(xid: number, commitLsn: number, endLsn: number, commitTime: number): void {
    this.snapshots.streamCommit(xid);
    this.builder.streamCommit(xid, commitLsn, endLsn, commitTime);
  }

  streamAbort(xid: number, subXid: number): void {
    this.snapshots.streamAbort(xid, subXid);
    this.builder.streamAbort(xid, subXid);
  }

  insert(relationOid: number, after: TupleView): void {
    if (this.isSkipped(relationOid)) return;
    this.snapshots.changed(relationOid, after);
    this.builder.insert(relationOid, after);
  }

  update(
    relationOid: number,
    beforeKind: 'K' | 'O' | null,
    before: TupleView | null,
    after: TupleView,
  ): void {
    if (this.isSkipped(relationOid)) return;
    this.snapshots.updated(relationOid, before, after);
    this.builder.update(relationOid, beforeKind, before, after);
  }

  delete(relationOid: number, beforeKind: 'K' | 'O', before: TupleView): void {
    if (this.isSkipped(relationOid)) return;
    this.snapshots.changed(relationOid, before);
    this.builder.delete(relationOid, beforeKind, before);
  }

  private isSkipped(relationOid: number): boolean {
    return this.skippedRelations.size > 0 && this.skippedRelations.has(relationOid);
  }

  other(message: PgoutputMessage): void {
    switch (message.tag) {
      case 'relation': {
        if (this.o.skippedTables.has(`${message.schema}.${message.name}`)) {
          this.skippedRelations.add(message.relationOid);
          return;
        }
        const { catalog } = this.o;
        const b = this.builder;
        this.o.block(async () => {
          b.relation(await catalog.resolveRelation(message));
        });
        return;
      }
      case 'type':
        this.o.catalog.noteType(message.typeOid, message.name);
        return;
      case 'truncate':
        for (const oid of message.relationOids) this.snapshots.truncated(oid);
        this.builder.truncate(
          message.relationOids.filter((oid) => !this.isSkipped(oid)),
          message.cascade,
          message.restartIdentity,
        );
        return;
      case 'message':
        this.onLogicalMessage(message);
        return;
      default:
        // Origin messages carry nothing we store.
        return;
    }
  }

  /**
   * A logical message (pg_logical_emit_message) with a configured prefix: a transactional one is
   * an event in its transaction, in order; a non-transactional one is stored on its own, with the
   * checkpoint at its end (see BatchBuilder.standaloneMessage).
   */
  private onLogicalMessage(message: Extract<PgoutputMessage, { tag: 'message' }>): void {
    if (message.prefix === WATERMARK_PREFIX && message.transactional) {
      this.snapshots.watermark(message.content);
      return;
    }
    if (message.prefix === DDL_MESSAGE_PREFIX && this.o.source.ddl && message.transactional) {
      this.builder.ddl(message.content);
      return;
    }
    if (!this.messagePrefixes.has(message.prefix)) return;
    if (message.transactional) {
      this.builder.message(message.prefix, message.content);
      return;
    }
    const lsn = Number(message.lsn);
    // µs since 2000-01-01, as commit times travel.
    const readAt = Date.now() * 1000 - Number(PG_EPOCH_OFFSET_US);
    this.builder.standaloneMessage(lsn, readAt, message.prefix, message.content);
  }
}
