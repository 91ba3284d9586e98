/**
 * The error policy: for every fatal code, what happened in one line, what Philotes does about it
 * (the retry directive), what a person does (the fix, with the source's names filled in) and where
 * the docs explain it. Throw sites, `check`, `status`, the status page and /readyz take the fix
 * from here, so that a code says the same thing wherever it is met; a test holds the docs'
 * fatal-state table to one row per code. After supabase/etl's error_policy.rs.
 *
 * What "fatal" means here (errors.ts decides which errors are): retrying cannot fix it, so the
 * source stops and says so; Philotes still tries it again every PHILOTES_RESTART_MAX_DELAY, so
 * that it recovers by itself once the cause is fixed.
 */
import type { SourceConfig } from './config.js';
import { passwordSource, type FatalCode } from './errors.js';
import { resetCommand, where, workerCommand } from './source-names.js';

export type RetryDirective =
  /** Stops the source; tried again every PHILOTES_RESTART_MAX_DELAY, it recovers once fixed. */
  | 'retry_slowly'
  /**
   * Changes were lost: as retry_slowly, and the way past is reset-source; with `snapshot:
   * when_needed` the gap is recorded and a snapshot begins by itself instead.
   */
  | 'recover_with_snapshot'
  /** As retry_slowly, but only reset-source gets past it (it records the gap, or retracts). */
  | 'needs_reset';

export interface FatalPolicy {
  readonly summary: string;
  readonly retry: RetryDirective;
  /** What a person does, for this source. */
  fix(source: SourceConfig): string;
  /** The docs page and anchor that explain the code. */
  readonly docs: string;
  /**
   * How `check` finds it before a run — the name of its finding (the same rule the run applies) —
   * or why nothing can know it beforehand. test/unit/fatal-coverage.test.ts holds every code to it.
   */
  readonly beforehand: { readonly check: string } | { readonly unknowable: string };
}

const OPERATIONS_DOC = 'docs/operations.md';
const RETRACTS = "(retracts the buffer's events of the lost history and records what was lost)";

function docs(code: FatalCode): string {
  return `${OPERATIONS_DOC}#${code.toLowerCase()}`;
}

const POLICY: { readonly [code in FatalCode]: Omit<FatalPolicy, 'docs'> } = {
  WAL_LEVEL_NOT_LOGICAL: {
    summary: 'the source server does not write logical WAL (wal_level is not logical)',
    retry: 'retry_slowly',
    beforehand: { check: 'wal_level' },
    fix: (s) =>
      `ALTER SYSTEM SET wal_level = logical on ${where(s)}, then restart that server (or set it in postgresql.conf)`,
  },
  SERVER_TOO_OLD: {
    summary: 'the source server lacks a feature the configuration asks for',
    retry: 'retry_slowly',
    beforehand: { check: 'protocol' },
    fix: () =>
      'use PostgreSQL 14 or later for protocol 2, logical messages, DDL capture and snapshots (10 or later for capture at all), or turn off the feature for this source',
  },
  NO_REPLICATION_ATTRIBUTE: {
    summary: 'the source role may not use replication',
    retry: 'retry_slowly',
    beforehand: { check: 'replication' },
    // On Amazon RDS: GRANT rds_replication TO the role instead (the docs say so).
    fix: (s) => `ALTER ROLE ${s.connection.user} REPLICATION`,
  },
  NO_PRIVILEGE: {
    summary: 'the source role lacks a privilege Philotes needs (creating the publication)',
    retry: 'retry_slowly',
    beforehand: { check: 'publication' },
    fix: (s) =>
      `create publication "${s.publication}" as a superuser or the tables' owner, or list tables ${s.connection.user} owns in the source's tables`,
  },
  NO_FREE_SLOT: {
    summary: 'every replication slot of the source server is in use',
    retry: 'retry_slowly',
    beforehand: { check: 'slot' },
    fix: (s) =>
      `raise max_replication_slots on ${where(s)} (a restart), or drop a slot nobody reads`,
  },
  TABLE_MISSING: {
    summary: 'a table the configuration lists does not exist on the source',
    retry: 'retry_slowly',
    beforehand: { check: 'publication' },
    fix: () => "correct the source's tables, or create the table",
  },
  KEYLESS_TABLES: {
    summary:
      'the publication Philotes would create covers tables without a replica identity, whose UPDATE and DELETE PostgreSQL would then refuse',
    retry: 'retry_slowly',
    beforehand: { check: 'replica identity' },
    fix: (s) =>
      `give those tables a primary key (or REPLICA IDENTITY FULL), or set keylessTables for source ${s.id}: leave_out (publish the others, kept current), identity_full (Philotes sets REPLICA IDENTITY FULL; the role must own them) or accept (published; their UPDATE and DELETE fail)`,
  },
  SLOT_WRONG_KIND: {
    summary: 'the configured slot exists but is not a logical pgoutput slot',
    retry: 'retry_slowly',
    beforehand: { check: 'slot' },
    fix: (s) => `choose another slot name for this source than "${s.slot}"`,
  },
  SLOT_WRONG_DATABASE: {
    summary: 'the configured slot belongs to another database',
    retry: 'retry_slowly',
    beforehand: { check: 'slot' },
    fix: (s) =>
      `choose another slot name for this source than "${s.slot}", or point it at the slot's database`,
  },
  SLOT_MISSING: {
    summary:
      'the slot is gone while the buffer has a checkpoint: changes since it are in no stream',
    retry: 'recover_with_snapshot',
    beforehand: { check: 'slot' },
    // It creates the slot and records the gap; with --snapshot it also rebuilds the tables.
    fix: (s) => resetCommand(s),
  },
  SLOT_ADVANCED: {
    summary: 'another client moved the slot past what Philotes stored; the server would skip it',
    retry: 'recover_with_snapshot',
    beforehand: { check: 'continuity' },
    fix: (s) => resetCommand(s),
  },
  SLOT_INVALIDATED: {
    summary: 'the server invalidated the slot (it needed more WAL than it may keep)',
    retry: 'recover_with_snapshot',
    beforehand: { check: 'slot' },
    fix: (s) => resetCommand(s),
  },
  WAL_REMOVED: {
    summary: 'the server removed WAL the slot still needs',
    retry: 'recover_with_snapshot',
    beforehand: {
      unknowable:
        'the server says the WAL is gone only when the stream asks for it; check warns while wal_status is unreserved',
    },
    fix: (s) => resetCommand(s),
  },
  PUBLICATION_MISSING: {
    summary: 'the publication is missing at a point of the WAL the slot must decode',
    retry: 'needs_reset',
    beforehand: { check: 'publication' },
    fix: (s) =>
      `create publication "${s.publication}" again, then ${resetCommand(s, ' --skip-to-current')} (the changes while it was missing cannot be decoded)`,
  },
  SOURCE_DIVERGED: {
    summary: 'the server is the same cluster on another history (restored, or failed over behind)',
    retry: 'needs_reset',
    beforehand: { check: 'history' },
    // With --snapshot it also rebuilds the tables from the new history.
    fix: (s) => `${resetCommand(s)} ${RETRACTS}`,
  },
  SOURCE_REPLACED: {
    summary: 'the server is another cluster, or the database was created again',
    retry: 'needs_reset',
    beforehand: { check: 'history' },
    // Check the source's host first: a wrong host looks the same.
    fix: (s) => `${resetCommand(s, ' --snapshot')} ${RETRACTS}`,
  },
  VALUE_UNENCODABLE: {
    summary: 'a value Philotes cannot encode without loss (a Philotes bug)',
    retry: 'needs_reset',
    beforehand: { unknowable: 'a value the stream has not sent yet' },
    fix: (s) =>
      `report it with the type; to skip the transaction (a gap, recorded): ${resetCommand(s, ' --skip-to-current')}`,
  },
  TRANSACTION_TOO_LARGE: {
    summary: 'one transaction has more changes than cdc_events.seq can number (2^31 - 1)',
    retry: 'needs_reset',
    beforehand: { unknowable: 'a transaction the stream has not sent yet' },
    fix: (s) => `to skip it (a gap, recorded): ${resetCommand(s, ' --skip-to-current')}`,
  },
  DDL_TRIGGER_MISSING: {
    summary: 'ddl: true, but the DDL capture trigger is missing, outdated or disabled',
    retry: 'retry_slowly',
    beforehand: { check: 'ddl capture' },
    fix: (s) =>
      `${workerCommand(s, 'ddl-trigger', `--source ${s.id} --print`)} | psql as a superuser (or give the role superuser for one start), or set ddl: false`,
  },
};

/** Every fatal code, in the docs' order. */
export const FATAL_CODES = Object.keys(POLICY) as FatalCode[];

export function isFatalCode(code: unknown): code is FatalCode {
  return typeof code === 'string' && Object.hasOwn(POLICY, code);
}

/** The policy of `code`. */
export function policyOf(code: FatalCode): FatalPolicy {
  return { ...POLICY[code], docs: docs(code) };
}

/** The fix for `code` on `source`, or null for a code that is not fatal (or none). */
/**
 * The server's own refusals that retrying cannot fix (errors.ts FATAL_SQLSTATES) arrive with a
 * SQLSTATE, not one of our codes: what a person does about the common ones.
 */
const SQLSTATE_FIXES: Readonly<Record<string, (s: SourceConfig) => string>> = {
  '28P01': (s) =>
    `check the password of user ${s.connection.user} for ${where(s)} ${passwordSource(s.connection)}; a passwordFile is read again at every attempt`,
  '28000': (s) =>
    `let user ${s.connection.user} connect in pg_hba.conf on ${where(s)}, for database ${s.connection.database} and for replication`,
  '3D000': (s) =>
    `create database ${s.connection.database} on ${where(s)}, or correct the source's database`,
  '42501': (s) =>
    `grant ${s.connection.user} the privilege named above (${workerCommand(s, 'check', '')} lists what the run needs)`,
};

export function fixFor(code: string | null | undefined, source: SourceConfig): string | null {
  if (isFatalCode(code)) return POLICY[code].fix(source);
  const fix = code === null || code === undefined ? undefined : SQLSTATE_FIXES[code];
  return fix === undefined ? null : fix(source);
}
