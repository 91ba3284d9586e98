import { describe, expect, it } from 'vitest';
import {
  keyOf,
  parseWatermark,
  SnapshotWindow,
  watermarkContent,
} from '../../workers/snapshot/window.js';
import { chunkQuery, rereadQuery } from '../../workers/snapshot/chunk-query.js';
import { ChunkRows } from '../../workers/snapshot/chunk-rows.js';
import { TupleView } from '../../workers/decode/pgoutput.js';

describe('snapshot window', () => {
  const rows = [1, 2, 3, 4].map((id) => keyOf([String(id)]));

  it('drops the rows whose key changed between the watermarks, keeps the rest', () => {
    const w = new SnapshotWindow('public.t', 0);
    w.noteChange(keyOf(['1'])); // before the low watermark: the chunk reflects it
    w.openAt();
    w.setRows(rows.length, (i) => rows[i]!);
    w.noteChange(keyOf(['2']));
    w.noteChange(keyOf(['9'])); // not in the chunk
    expect(w.close()).toEqual([0, 2, 3]);
  });

  it('reads again, not drops, a row an UPDATE touched without its TOASTed columns', () => {
    const w = new SnapshotWindow('public.t', 0);
    w.openAt();
    w.setRows(rows.length, (i) => rows[i]!);
    w.notePartialUpdate(keyOf(['2']));
    w.notePartialUpdate(keyOf(['7'])); // not in the chunk: its own chunk reads it
    w.noteChange(keyOf(['3']));
    expect(w.close()).toEqual([0, 3]);
    expect(w.reread).toEqual([['2']]);
  });

  it('reread query: the chosen keys, cast back to the key types, any number of them', () => {
    const q = rereadQuery(
      {
        schema: 's',
        table: 't',
        columns: ['a', 'b', 'v'],
        primaryKey: ['a', 'b'],
        primaryKeyTypes: ['bigint', 'text'],
      },
      [
        ['1', 'x'],
        ['2', 'y'],
      ],
    );
    expect(q.text).toBe(
      'SELECT t."a"::text, t."b"::text, t."v"::text FROM "s"."t" AS t WHERE (t."a", t."b") IN (SELECT u.k0::bigint, u.k1::text FROM unnest($1::text[], $2::text[]) AS u(k0, k1)) ORDER BY t."a", t."b"',
    );
    expect(q.values).toEqual([
      ['1', '2'],
      ['x', 'y'],
    ]);
  });

  it('refuses a high watermark before the low one or before the rows', () => {
    const w = new SnapshotWindow('public.t', 3);
    expect(() => w.close()).toThrow('without its low one');
    w.openAt();
    expect(() => w.close()).toThrow('before its rows');
  });

  it('keys: composite and NULL-safe', () => {
    expect(keyOf(['a', 'b'])).not.toBe(keyOf(['ab']));
    expect(keyOf([null])).not.toBe(keyOf(['']));
  });

  it('watermark messages round-trip; anything else is not one', () => {
    const w = { run: 'r1', snapshot: 7, table: 'public.t', chunk: 2, mark: 'high' as const };
    expect(parseWatermark(Buffer.from(watermarkContent(w)))).toEqual(w);
    expect(parseWatermark(Buffer.from('{"run": 1}'))).toBeNull();
    expect(parseWatermark(Buffer.from('not json'))).toBeNull();
  });

  it('chunk query: every column as text, row comparison in the key types, index order', () => {
    const q = chunkQuery(
      {
        schema: 'shop',
        table: 'line "items"',
        columns: ['order_id', 'n', 'note'],
        primaryKey: ['order_id', 'n'],
        primaryKeyTypes: ['bigint', 'integer'],
      },
      ['10', '3'],
      500,
    );
    expect(q.text).toBe(
      'SELECT t."order_id"::text, t."n"::text, t."note"::text FROM "shop"."line ""items""" AS t WHERE (t."order_id", t."n") > ($1::text::bigint, $2::text::integer) ORDER BY t."order_id", t."n" LIMIT 500',
    );
    expect(q.values).toEqual(['10', '3']);
    expect(
      chunkQuery(
        { schema: 's', table: 't', columns: ['a'], primaryKey: ['a'], primaryKeyTypes: ['int'] },
        null,
        2,
      ).text,
    ).toBe('SELECT t."a"::text FROM "s"."t" AS t  ORDER BY t."a" LIMIT 2');
  });

  it('chunk rows: DataRow bodies kept as bytes, keys from the key columns, cut at the byte limit', () => {
    const body = (values: Array<string | null>) => {
      const parts = [Buffer.from([0, values.length])];
      for (const v of values) {
        const len = Buffer.alloc(4);
        len.writeInt32BE(v === null ? -1 : Buffer.byteLength(v));
        parts.push(len, Buffer.from(v ?? ''));
      }
      return Buffer.concat(parts);
    };
    const rows = new ChunkRows(40);
    rows.add(body(['1', 'a', 'ü']));
    rows.add(body(['2', null, 'b'.repeat(30)]));
    rows.add(body(['3', 'c', 'd'])); // past 40 bytes: let go
    expect(rows.count).toBe(2);
    expect(rows.cut).toBe(true);
    expect([rows.key(0, [0, 1]), rows.key(1, [0, 1])]).toEqual([
      keyOf(['1', 'a']),
      keyOf(['2', null]),
    ]);
    expect(rows.keyTexts(0, [0])).toEqual(['1']);
    const t = rows.view(1, new TupleView());
    expect([t.count, t.isNull(1), t.text(2)]).toEqual([3, true, 'b'.repeat(30)]);
  });
});
