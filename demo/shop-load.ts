/**
 * The demo's write load: a small shop (customers, orders, carts) written by concurrent clients in
 * short transactions, each change counted in a Tally — what the buffer must end up holding.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import type pg from 'pg';
import type { DemoSession } from './session.js';

export const LOAD_CLIENTS = 3;
export const TRANSACTIONS_PER_CLIENT = 60;

export type Operation = 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE' | 'SNAPSHOT';
export const OPERATIONS: readonly Operation[] = [
  'SNAPSHOT',
  'INSERT',
  'UPDATE',
  'DELETE',
  'TRUNCATE',
];

/** Rows the shop holds before Philotes starts: the initial snapshot copies them. */
export const EXISTING_CUSTOMERS = 20_000;
export const EXISTING_ORDERS = 40_000;

/**
 * Years of rows, in a moment: customers and their orders written before Philotes starts, which
 * the initial snapshot copies into the buffer as SNAPSHOT events while the stream goes on.
 */
export async function seedExisting(source: pg.Client): Promise<Tally> {
  await source.query(
    `INSERT INTO shop.customers (email, name, tags, balance, profile, created_at)
     SELECT 'existing' || g || '@example.com', 'Customer ' || g, ARRAY['imported'],
            (g % 1000) / 4.0, jsonb_build_object('since', 2015 + g % 10),
            timestamptz '2020-01-01 00:00:00+00' + g * interval '1 hour'
       FROM generate_series(1, $1::int) g`,
    [EXISTING_CUSTOMERS],
  );
  await source.query(
    `INSERT INTO shop.orders (customer_id, status, total, items, placed_at, shipped_at)
     SELECT c.id, 'shipped', (g % 500) + 0.99, jsonb_build_array(jsonb_build_object('sku', 'TEA-01', 'qty', 1 + g % 3)),
            c.created_at + interval '1 day', c.created_at + interval '3 days'
       FROM generate_series(1, $1::int) g
       JOIN shop.customers c ON c.email = 'existing' || (1 + g % $2::int) || '@example.com'`,
    [EXISTING_ORDERS, EXISTING_CUSTOMERS],
  );
  const tally = new Tally();
  tally.add('SNAPSHOT', 'shop.customers', EXISTING_CUSTOMERS);
  tally.add('SNAPSHOT', 'shop.orders', EXISTING_ORDERS);
  return tally;
}

export const SHOP_SCHEMA = `
  CREATE SCHEMA shop;
  CREATE TABLE shop.customers (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text NOT NULL,
    tags       text[] NOT NULL DEFAULT '{}',
    balance    numeric(16,4) NOT NULL DEFAULT 0,
    profile    jsonb,
    avatar     bytea,
    notes      text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
  );
  -- Long notes go out of line (TOAST) uncompressed: updates that do not touch them show how an
  -- unchanged TOASTed value is reported (left out of "after", named in unchanged_columns).
  ALTER TABLE shop.customers ALTER COLUMN notes SET STORAGE EXTERNAL;
  CREATE TABLE shop.orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES shop.customers (id),
    status      text NOT NULL DEFAULT 'new',
    total       numeric(12,2) NOT NULL,
    items       jsonb NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    shipped_at  timestamptz
  );
  -- Whole old rows in "before" for orders; customers keep the default (key only).
  ALTER TABLE shop.orders REPLICA IDENTITY FULL;
  CREATE TABLE shop.cart_items (
    session_id uuid NOT NULL,
    sku        text NOT NULL,
    qty        int NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (session_id, sku)
  );
`;

/** Committed changes, by `OPERATION table`: what the buffer must end up holding. */
export class Tally {
  readonly counts = new Map<string, number>();
  add(operation: Operation, table: string, rows: number | null): void {
    if (!rows) return;
    const key = `${operation} ${table}`;
    this.counts.set(key, (this.counts.get(key) ?? 0) + rows);
  }
  merge(other: Tally): void {
    for (const [key, n] of other.counts) this.counts.set(key, (this.counts.get(key) ?? 0) + n);
  }
  byOperation(operation: Operation): number {
    let total = 0;
    for (const [key, n] of this.counts) if (key.startsWith(`${operation} `)) total += n;
    return total;
  }
  get total(): number {
    let total = 0;
    for (const n of this.counts.values()) total += n;
    return total;
  }
}

interface Shop {
  customers: string[];
  newOrders: string[];
  orders: string[];
  carts: string[];
  signups: number;
}

const FIRST = [
  'Ada',
  'Grace',
  'Linus',
  'Margaret',
  'Edsger',
  'Barbara',
  'Ken',
  'Frances',
  'Zoë',
  'Łukasz',
];
const LAST = [
  'Lovelace',
  'Hopper',
  'Torvalds',
  'Hamilton',
  'Dijkstra',
  'Liskov',
  'Thompson',
  'Allen',
];
const TAGS = ['vip', 'newsletter', 'eu,west', 'likes "fast" shipping', 'back\\slash', 'NULL'];
const SKUS = ['TEA-01', 'TEA-02', 'MUG-11', 'POT-03', 'CUP-07', 'SPOON-2'];

const random = <T>(items: readonly T[]): T => items[Math.floor(Math.random() * items.length)]!;
const takeRandom = (items: string[]): string | undefined =>
  items.length === 0 ? undefined : items.splice(Math.floor(Math.random() * items.length), 1)[0];
const money = (max: number): string => (Math.random() * max).toFixed(2);

/** One transaction's statements; returns what to remember once it has committed. */
type Action = (c: pg.Client, t: Tally, shop: Shop) => Promise<(() => void) | void>;

async function insertOrder(c: pg.Client, t: Tally, customerId: string): Promise<string> {
  const items = Array.from({ length: 1 + Math.floor(Math.random() * 3) }, () => ({
    sku: random(SKUS),
    qty: 1 + Math.floor(Math.random() * 4),
    price: money(40),
  }));
  const r = await c.query<{ id: string }>(
    'INSERT INTO shop.orders (customer_id, total, items) VALUES ($1, $2, $3::jsonb) RETURNING id',
    [customerId, money(500), JSON.stringify(items)],
  );
  t.add('INSERT', 'shop.orders', r.rowCount);
  return r.rows[0]!.id;
}

const ACTIONS: ReadonlyArray<readonly [number, Action]> = [
  [
    3,
    async function signup(c, t, shop) {
      const n = ++shop.signups;
      const name = `${random(FIRST)} ${random(LAST)}`;
      const profile = `{"plan": "${random(['free', 'pro', 'team'])}", "newsletter": ${Math.random() < 0.5},
        "loyalty": {"points": 18446744073709551616${n}, "ratio": 0.1000000000000000055511151231257827}}`;
      const notes =
        Math.random() < 0.4 ? `${name} wrote: ${randomBytes(1600).toString('hex')}` : null;
      const r = await c.query<{ id: string }>(
        `INSERT INTO shop.customers (email, name, tags, balance, profile, avatar, notes)
         VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7) RETURNING id`,
        [
          `customer${n}.${randomBytes(3).toString('hex')}@example.com`,
          name,
          [...new Set([random(TAGS), random(TAGS), random(TAGS)])],
          `${Math.floor(Math.random() * 1e9)}.${String(Math.floor(Math.random() * 1e4)).padStart(4, '0')}`,
          profile,
          randomBytes(6),
          notes,
        ],
      );
      t.add('INSERT', 'shop.customers', r.rowCount);
      const customer = r.rows[0]!.id;
      const order = await insertOrder(c, t, customer);
      return () => {
        shop.customers.push(customer);
        shop.orders.push(order);
        shop.newOrders.push(order);
      };
    },
  ],
  [
    4,
    async function order(c, t, shop) {
      const customer = shop.customers.length > 0 ? random(shop.customers) : undefined;
      if (customer === undefined) return;
      const id = await insertOrder(c, t, customer);
      return () => {
        shop.orders.push(id);
        shop.newOrders.push(id);
      };
    },
  ],
  [
    3,
    async function ship(c, t, shop) {
      const id = takeRandom(shop.newOrders);
      if (id === undefined) return;
      const r = await c.query(
        `UPDATE shop.orders SET status = 'shipped', shipped_at = clock_timestamp()
          WHERE id = $1 AND status = 'new'`,
        [id],
      );
      t.add('UPDATE', 'shop.orders', r.rowCount);
    },
  ],
  [
    3,
    async function pay(c, t, shop) {
      if (shop.customers.length === 0) return;
      const r = await c.query('UPDATE shop.customers SET balance = balance + $2 WHERE id = $1', [
        random(shop.customers),
        money(100),
      ]);
      t.add('UPDATE', 'shop.customers', r.rowCount);
    },
  ],
  [
    2,
    async function cancel(c, t, shop) {
      const id = takeRandom(shop.orders);
      if (id === undefined) return;
      const i = shop.newOrders.indexOf(id);
      if (i >= 0) shop.newOrders.splice(i, 1);
      const r = await c.query('DELETE FROM shop.orders WHERE id = $1', [id]);
      t.add('DELETE', 'shop.orders', r.rowCount);
    },
  ],
  [
    3,
    async function cart(c, t, shop) {
      const session = randomUUID();
      const skus = [
        ...new Set(Array.from({ length: 1 + Math.floor(Math.random() * 3) }, () => random(SKUS))),
      ];
      const r = await c.query(
        'INSERT INTO shop.cart_items (session_id, sku, qty) SELECT $1, unnest($2::text[]), 1',
        [session, skus],
      );
      t.add('INSERT', 'shop.cart_items', r.rowCount);
      return () => void shop.carts.push(session);
    },
  ],
  [
    1,
    async function bump(c, t, shop) {
      if (shop.carts.length === 0) return;
      const r = await c.query('UPDATE shop.cart_items SET qty = qty + 1 WHERE session_id = $1', [
        random(shop.carts),
      ]);
      t.add('UPDATE', 'shop.cart_items', r.rowCount);
    },
  ],
  [
    1,
    async function churn(c, t, shop) {
      const id = takeRandom(shop.customers);
      if (id === undefined) return;
      // Only customers without orders can go: no cascades, so every change is one we counted.
      const r = await c.query(
        `DELETE FROM shop.customers c WHERE id = $1
           AND NOT EXISTS (SELECT FROM shop.orders o WHERE o.customer_id = c.id)`,
        [id],
      );
      t.add('DELETE', 'shop.customers', r.rowCount);
      if (!r.rowCount) return () => void shop.customers.push(id);
    },
  ],
];

const TOTAL_WEIGHT = ACTIONS.reduce((sum, [w]) => sum + w, 0);

function pickAction(shop: Shop): Action {
  if (shop.customers.length < 3) return ACTIONS[0]![1];
  let r = Math.random() * TOTAL_WEIGHT;
  for (const [weight, action] of ACTIONS) {
    r -= weight;
    if (r < 0) return action;
  }
  return ACTIONS[0]![1];
}

interface LoadResult {
  /** Committed transactions that changed at least one row. */
  committed: number;
  empty: number;
  rolledBack: number;
}

/** Integrity (23xxx) and concurrency (40xxx) errors end one transaction, not the demo. */
function expectedConflict(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && (code.startsWith('23') || code.startsWith('40'));
}

async function shopper(
  session: DemoSession,
  c: pg.Client,
  shop: Shop,
  tally: Tally,
  result: LoadResult,
): Promise<void> {
  for (let i = 0; i < TRANSACTIONS_PER_CLIENT; i++) {
    session.checkAbort();
    const pending = new Tally();
    const action = pickAction(shop);
    try {
      await c.query('BEGIN');
      const remember = await action(c, pending, shop);
      await c.query('COMMIT');
      tally.merge(pending);
      remember?.();
      // A transaction that changed nothing is not sent by pgoutput (PostgreSQL >= 15).
      if (pending.total > 0) result.committed++;
      else result.empty++;
    } catch (error) {
      await c.query('ROLLBACK').catch(() => undefined);
      if (!expectedConflict(error)) throw error;
      result.rolledBack++;
    }
    await delay(5 + Math.random() * 40, undefined, { signal: session.abort.signal }).catch(
      () => undefined,
    );
  }
}

export interface Load extends LoadResult {
  readonly tally: Tally;
  readonly ms: number;
}

export async function writeLoad(
  session: DemoSession,
  port: number,
  password: string,
  source: pg.Client,
): Promise<Load> {
  const started = performance.now();
  const tally = new Tally();
  const result: LoadResult = { committed: 0, empty: 0, rolledBack: 0 };
  const shop: Shop = { customers: [], newOrders: [], orders: [], carts: [], signups: 0 };
  const clients = await Promise.all(
    Array.from({ length: LOAD_CLIENTS }, () => session.connect(port, password, 'demo_source')),
  );
  await Promise.all(clients.map((c) => shopper(session, c, shop, tally, result)));
  await source.query('TRUNCATE shop.cart_items');
  tally.add('TRUNCATE', 'shop.cart_items', 1);
  result.committed++;
  for (const c of clients) await session.release(c);
  return { ...result, tally, ms: performance.now() - started };
}
