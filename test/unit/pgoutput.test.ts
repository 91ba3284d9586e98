/**
 * pgoutput messages built by hand, byte by byte, after
 * https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html (protocol 1),
 * decoded the way the reader decodes them: PgoutputDecoder, which hands the rare messages to
 * parsePgoutput.
 */
import { describe, expect, it } from 'vitest';
import {
  Msg,
  UNCHANGED,
  decodeMessage,
  decodeMessages,
  type TupleValue,
} from '../support/pgoutput.js';

const LSN = (1n << 32n) | 0x16b3748n; // 1/16B3748
const END_LSN = (1n << 32n) | 0x16b3790n;
const TIME = 817_347_018_120_345n; // µs since 2000-01-01
const BIG_OID = 0x8000_0001; // above 2^31: must not come out negative

describe('pgoutput decoding', () => {
  it("Begin 'B'", () => {
    const msg = new Msg('B').uint64(LSN).int64(TIME).uint32(0xffff_fffe).build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'begin',
      finalLsn: LSN,
      commitTime: TIME,
      xid: 4_294_967_294, // xid is unsigned
    });
  });

  it("Commit 'C'", () => {
    const msg = new Msg('C').int8(0).uint64(LSN).uint64(END_LSN).int64(TIME).build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'commit',
      commitLsn: LSN,
      endLsn: END_LSN,
      commitTime: TIME,
    });
  });

  it('a commit time before 2000 is negative', () => {
    const msg = new Msg('C').int8(0).uint64(LSN).uint64(END_LSN).int64(-1n).build();
    expect(decodeMessage(msg)).toMatchObject({ commitTime: -1n });
  });

  it("Origin 'O'", () => {
    const msg = new Msg('O').uint64(LSN).string('pg_16390').build();
    expect(decodeMessage(msg)).toEqual({ tag: 'origin', lsn: LSN, name: 'pg_16390' });
  });

  it("Relation 'R'", () => {
    const msg = new Msg('R')
      .uint32(BIG_OID)
      .string('shop')
      .string('orders')
      .byte('d')
      .int16(3)
      .int8(1)
      .string('id')
      .uint32(20)
      .int32(-1)
      .int8(0)
      .string('amount')
      .uint32(1700)
      .int32((12 << 16) + 2 + 4)
      .int8(0)
      .string('notes é')
      .uint32(25)
      .int32(-1)
      .build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'relation',
      relationOid: BIG_OID,
      schema: 'shop',
      name: 'orders',
      replicaIdentity: 'd',
      columns: [
        { flags: 1, name: 'id', typeOid: 20, typeMod: -1 },
        { flags: 0, name: 'amount', typeOid: 1700, typeMod: (12 << 16) + 6 },
        { flags: 0, name: 'notes é', typeOid: 25, typeMod: -1 },
      ],
    });
  });

  it('Relation with REPLICA IDENTITY FULL, pg_catalog (empty namespace) and no columns', () => {
    const msg = new Msg('R').uint32(42).string('').string('t').byte('f').int16(0).build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'relation',
      relationOid: 42,
      schema: '',
      name: 't',
      replicaIdentity: 'f',
      columns: [],
    });
  });

  it("Type 'Y'", () => {
    const msg = new Msg('Y').uint32(16_500).string('shop').string('mood').build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'type',
      typeOid: 16_500,
      schema: 'shop',
      name: 'mood',
    });
  });

  it("Insert 'I' with 't', 'n' and 'u' values", () => {
    const after: TupleValue[] = ['42', null, UNCHANGED, '', 'é 🐘 tab\t"q"', '{"a": [1, 2]}'];
    const msg = new Msg('I').uint32(BIG_OID).byte('N').tuple(after).build();
    const parsed = decodeMessage(msg);
    expect(parsed).toEqual({ tag: 'insert', relationOid: BIG_OID, after });
    // The unchanged marker is the exported symbol, not null or undefined.
    expect(parsed.tag === 'insert' && parsed.after[2]).toBe(UNCHANGED);
  });

  it("'t' lengths count bytes, not characters", () => {
    const msg = new Msg('I').uint32(1).byte('N').tuple(['🐘🐘', 'x']).build();
    expect(decodeMessage(msg)).toMatchObject({ after: ['🐘🐘', 'x'] });
  });

  it("Update 'U' with only the new tuple", () => {
    const msg = new Msg('U').uint32(7).byte('N').tuple(['1', 'new']).build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'update',
      relationOid: 7,
      beforeKind: null,
      before: null,
      after: ['1', 'new'],
    });
  });

  it("Update 'U' with a 'K' key tuple", () => {
    const msg = new Msg('U')
      .uint32(7)
      .byte('K')
      .tuple(['1', null])
      .byte('N')
      .tuple(['2', UNCHANGED])
      .build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'update',
      relationOid: 7,
      beforeKind: 'K',
      before: ['1', null],
      after: ['2', UNCHANGED],
    });
  });

  it("Update 'U' with an 'O' old tuple", () => {
    const msg = new Msg('U')
      .uint32(7)
      .byte('O')
      .tuple(['1', 'old text'])
      .byte('N')
      .tuple(['1', UNCHANGED])
      .build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'update',
      relationOid: 7,
      beforeKind: 'O',
      before: ['1', 'old text'],
      after: ['1', UNCHANGED],
    });
  });

  it("Delete 'D' with a 'K' or an 'O' tuple", () => {
    const key = new Msg('D').uint32(7).byte('K').tuple(['1', null]).build();
    expect(decodeMessage(key)).toEqual({
      tag: 'delete',
      relationOid: 7,
      beforeKind: 'K',
      before: ['1', null],
    });
    const old = new Msg('D').uint32(7).byte('O').tuple(['1', 'gone']).build();
    expect(decodeMessage(old)).toEqual({
      tag: 'delete',
      relationOid: 7,
      beforeKind: 'O',
      before: ['1', 'gone'],
    });
  });

  it.each([
    [0, false, false],
    [1, true, false],
    [2, false, true],
    [3, true, true],
  ])("Truncate 'T' with options %d", (options, cascade, restartIdentity) => {
    const msg = new Msg('T')
      .int32(3)
      .int8(options)
      .uint32(16_384)
      .uint32(16_390)
      .uint32(BIG_OID)
      .build();
    expect(decodeMessage(msg)).toEqual({
      tag: 'truncate',
      cascade,
      restartIdentity,
      relationOids: [16_384, 16_390, BIG_OID],
    });
  });

  it("Message 'M', transactional or not", () => {
    const content = Buffer.from([0, 1, 2, 0xff]);
    const tx = new Msg('M').int8(1).uint64(LSN).string('philotes').int32(4).raw(content).build();
    const parsed = decodeMessage(tx);
    expect(parsed).toMatchObject({
      tag: 'message',
      transactional: true,
      lsn: LSN,
      prefix: 'philotes',
    });
    expect(parsed.tag === 'message' && [...parsed.content]).toEqual([0, 1, 2, 0xff]);
    const plain = new Msg('M').int8(0).uint64(LSN).string('hb').int32(0).build();
    expect(decodeMessage(plain)).toMatchObject({ transactional: false, prefix: 'hb' });
  });

  it('parses a message that sits inside a larger buffer (a subarray)', () => {
    const msg = new Msg('I').uint32(9).byte('N').tuple(['a', null]).build();
    const big = Buffer.concat([Buffer.from('garbage'), msg, Buffer.from('more')]);
    const view = big.subarray(7, 7 + msg.length);
    expect(decodeMessage(view)).toEqual({ tag: 'insert', relationOid: 9, after: ['a', null] });
  });

  it('protocol 2: a stream block whose messages carry the (sub)transaction xid, then its commit', () => {
    const XID = 0xffff_fff0;
    const SUB = 731;
    const calls = decodeMessages([
      new Msg('S').uint32(XID).int8(1).build(),
      new Msg('R')
        .uint32(XID)
        .uint32(BIG_OID)
        .string('shop')
        .string('orders')
        .byte('d')
        .int16(1)
        .int8(1)
        .string('id')
        .uint32(20)
        .int32(-1)
        .build(),
      new Msg('I').uint32(XID).uint32(BIG_OID).byte('N').tuple(['1']).build(),
      new Msg('U')
        .uint32(SUB)
        .uint32(BIG_OID)
        .byte('K')
        .tuple(['1'])
        .byte('N')
        .tuple(['2'])
        .build(),
      new Msg('D').uint32(SUB).uint32(BIG_OID).byte('O').tuple(['2']).build(),
      new Msg('M')
        .uint32(SUB)
        .int8(1)
        .uint64(LSN)
        .string('app')
        .int32(2)
        .byte('h')
        .byte('i')
        .build(),
      new Msg('E').build(),
      new Msg('A').uint32(XID).uint32(SUB).build(),
      new Msg('c').uint32(XID).int8(0).uint64(LSN).uint64(END_LSN).int64(TIME).build(),
      // After the block, messages have no xid again.
      new Msg('I').uint32(9).byte('N').tuple(['x']).build(),
    ]);
    expect(calls).toEqual([
      { tag: 'streamStart', xid: XID },
      { tag: 'streamChange', xid: XID },
      {
        tag: 'relation',
        relationOid: BIG_OID,
        schema: 'shop',
        name: 'orders',
        replicaIdentity: 'd',
        columns: [{ flags: 1, name: 'id', typeOid: 20, typeMod: -1 }],
      },
      { tag: 'streamChange', xid: XID },
      { tag: 'insert', relationOid: BIG_OID, after: ['1'] },
      { tag: 'streamChange', xid: SUB },
      { tag: 'update', relationOid: BIG_OID, beforeKind: 'K', before: ['1'], after: ['2'] },
      { tag: 'streamChange', xid: SUB },
      { tag: 'delete', relationOid: BIG_OID, beforeKind: 'O', before: ['2'] },
      { tag: 'streamChange', xid: SUB },
      { tag: 'message', transactional: true, lsn: LSN, prefix: 'app', content: Buffer.from('hi') },
      { tag: 'streamStop' },
      { tag: 'streamAbort', xid: XID, subXid: SUB },
      { tag: 'streamCommit', xid: XID, commitLsn: LSN, endLsn: END_LSN, commitTime: TIME },
      { tag: 'insert', relationOid: 9, after: ['x'] },
    ]);
  });

  it('throws on an unknown tag', () => {
    expect(() => decodeMessage(Buffer.from('Z'))).toThrow('pgoutput: unknown message tag 0x5a');
    // Two-phase messages are not asked for, so not understood.
    expect(() => decodeMessage(new Msg('P').int8(0).build())).toThrow(
      'pgoutput: unknown message tag 0x50',
    );
  });

  it("throws on binary ('b') tuple values, which we never request", () => {
    const msg = new Msg('I').uint32(1).byte('N').int16(1).byte('b').int32(1).int8(0).build();
    expect(() => decodeMessage(msg)).toThrow('pgoutput: unexpected tuple value kind 0x62');
  });

  it('throws on an unterminated string and on a truncated message', () => {
    const unterminated = new Msg('O').uint64(LSN).raw(Buffer.from('no-nul')).build();
    expect(() => decodeMessage(unterminated)).toThrow('pgoutput: unterminated string');
    const truncated = new Msg('B').uint64(LSN).build();
    expect(() => decodeMessage(truncated)).toThrow(RangeError);
  });
});
