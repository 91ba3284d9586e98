/**
 * Retryable versus fatal, table-driven: what restarts a reader with backoff, what stops a source
 * for good, and what the buffer's errors mean for an operator.
 */
import { loadConfig } from '../../src/common/config.js';
import { FATAL_CODES, fixFor, policyOf } from '../../src/common/error-policy.js';
import { describe, expect, it } from 'vitest';
import {
  classifyBufferError,
  ConnectionError,
  describeConnectionError,
  FatalSourceError,
  isFatal,
  ReaderAbortedError,
  ReaderError,
  SourceTimeoutError,
  toErrorInfo,
} from '../../src/common/errors.js';

/** An error as pg or Node reports it: a message and a code. */
function coded(code: string, message = `failed with ${code}`): Error {
  return Object.assign(new Error(message), { code });
}

describe('isFatal', () => {
  const cases: Array<[what: string, error: unknown, fatal: boolean]> = [
    ['invalid password (28P01)', coded('28P01'), true],
    ['pg_hba rejects us (28000)', coded('28000'), true],
    ['missing database (3D000)', coded('3D000'), true],
    ['missing privilege (42501)', coded('42501'), true],
    ['undefined object (42704)', coded('42704'), true],
    ['undefined table (42P01)', coded('42P01'), true],
    ['object not in prerequisite state (55000)', coded('55000'), true],
    ['admin shutdown (57P01)', coded('57P01'), false],
    ['server starting up (57P03)', coded('57P03'), false],
    ['too many connections (53300)', coded('53300'), false],
    ['serialization failure (40001)', coded('40001'), false],
    ['slot active for another pid (55006)', coded('55006'), false],
    ['read-only transaction (25006)', coded('25006'), false],
    ['connection refused', coded('ECONNREFUSED'), false],
    ['connection reset', coded('ECONNRESET'), false],
    ['timed out', coded('ETIMEDOUT'), false],
    ['broken pipe', coded('EPIPE'), false],
    ['host unreachable', coded('EHOSTUNREACH'), false],
    ['network unreachable', coded('ENETUNREACH'), false],
    ['unknown host', coded('ENOTFOUND'), false],
    ['DNS try again', coded('EAI_AGAIN'), false],
    ['no code: connection terminated', new Error('Connection terminated unexpectedly'), false],
    ['not an Error at all', 'boom', false],
    ['a fatal source error', new FatalSourceError('slot gone', 'SLOT_MISSING'), true],
    ['the source timeout', new SourceTimeoutError(31_000), false],
    ['an aborted run', new ReaderAbortedError(), false],
    [
      'a reader error that says fatal',
      new ReaderError({ name: 'X', message: 'x', fatal: true }),
      true,
    ],
    [
      'a reader error that says retryable, whatever its code',
      new ReaderError({ name: 'X', message: 'x', code: '28P01', fatal: false }),
      false,
    ],
  ];
  for (const [what, error, fatal] of cases) {
    it(`${what}: ${fatal ? 'fatal' : 'retried'}`, () => {
      expect(isFatal(error)).toBe(fatal);
    });
  }

  it('crosses the thread boundary with its code, verdict and details', () => {
    const original = new FatalSourceError('gap', 'SLOT_ADVANCED', { gapBytes: 42 });
    const rebuilt = new ReaderError(structuredClone(toErrorInfo(original)));
    expect(rebuilt).toMatchObject({
      message: 'gap',
      code: 'SLOT_ADVANCED',
      fatal: true,
      details: { gapBytes: 42 },
    });
    expect(isFatal(rebuilt)).toBe(true);
  });
});

describe('classifyBufferError', () => {
  const cases: Array<[error: unknown, problem: string, retry: boolean]> = [
    [coded('28P01'), 'credentials', false],
    [coded('28000'), 'credentials', false],
    [coded('3D000'), 'missing-database', false],
    [coded('42501'), 'privilege', false],
    [coded('25006'), 'read-only', true],
    [coded('53100'), 'disk-full', true],
    [coded('53300'), 'out-of-connections', true],
    [coded('57P03'), 'unreachable', true],
    [coded('57P01'), 'unreachable', true],
    [coded('08006'), 'unreachable', true],
    [coded('ECONNREFUSED'), 'unreachable', true],
    [coded('ENOTFOUND'), 'unreachable', true],
    [new Error('Connection terminated due to connection timeout'), 'unreachable', true],
    [coded('XX000', 'internal error'), 'other', true],
  ];
  for (const [error, problem, retry] of cases) {
    const code = (error as { code?: string }).code ?? (error as Error).message;
    it(`${code}: ${problem}, ${retry ? 'waited out' : 'fatal'}`, () => {
      const kind = classifyBufferError(error);
      expect(kind.problem).toBe(problem);
      expect(kind.retry).toBe(retry);
      expect(kind.summary.length).toBeGreaterThan(10);
    });
  }
});

describe('describeConnectionError', () => {
  const cases: Array<[error: Error, expected: RegExp]> = [
    [coded('ECONNREFUSED'), /^connection refused by source db\.internal:5432/],
    [coded('ENOTFOUND'), /^cannot resolve the source host "db\.internal"/],
    [coded('EAI_AGAIN'), /^cannot resolve the source host "db\.internal"/],
    [
      new Error('Connection terminated due to connection timeout'),
      /^connect timeout to source db\.internal:5432/,
    ],
    [coded('ETIMEDOUT'), /^connect timeout to source db\.internal:5432/],
    [coded('EHOSTUNREACH'), /^source db\.internal:5432 is unreachable/],
    [coded('ECONNRESET'), /^connection to source db\.internal:5432 was closed unexpectedly/],
  ];
  for (const [error, expected] of cases) {
    it(`${(error as { code?: string }).code ?? error.message}`, () => {
      const described = describeConnectionError(error, 'source', 'db.internal', 5432);
      expect(described).toBeInstanceOf(ConnectionError);
      expect((described as Error).message).toMatch(expected);
      // Still classified as before: a connection problem is retried.
      expect(isFatal(described)).toBe(false);
    });
  }

  it('leaves other errors alone', () => {
    const error = coded('28P01', 'password authentication failed');
    expect(describeConnectionError(error, 'buffer', 'h', 1)).toBe(error);
  });
});

describe('the error policy', () => {
  const source = loadConfig({
    PHILOTES_CDC_SOURCE_DATABASE: 'app',
    PHILOTES_CDC_SOURCE_USER: 'cdc_role',
    PHILOTES_CDC_SOURCE_ID: 'orders',
    PHILOTES_BUFFER_DATABASE: 'buffer',
    PHILOTES_BUFFER_USER: 'philotes',
  }).sources[0]!;

  it('gives every fatal code a summary, a retry directive, a fix for the source and its docs row', () => {
    for (const code of FATAL_CODES) {
      const policy = policyOf(code);
      expect(policy.summary.length, code).toBeGreaterThan(10);
      expect(policy.docs).toBe(`docs/operations.md#${code.toLowerCase()}`);
      expect(fixFor(code, source), code).toBe(policy.fix(source));
      expect(policy.fix(source).length, code).toBeGreaterThan(5);
    }
    expect(fixFor('57P01', source)).toBeNull();
    expect(fixFor(null, source)).toBeNull();
  });

  it("fills in the source's names", () => {
    expect(fixFor('NO_REPLICATION_ATTRIBUTE', source)).toBe('ALTER ROLE cdc_role REPLICATION');
    expect(fixFor('SLOT_MISSING', source)).toBe(
      'philotes-worker reset-source --source orders --accept-gap',
    );
  });

  it('only lost changes recover with a snapshot (snapshot: when_needed)', () => {
    expect(FATAL_CODES.filter((c) => policyOf(c).retry === 'recover_with_snapshot')).toEqual([
      'SLOT_MISSING',
      'SLOT_ADVANCED',
      'SLOT_INVALIDATED',
      'WAL_REMOVED',
    ]);
  });
});
