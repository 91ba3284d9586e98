import js from '@eslint/js';
import { defineConfig, globalIgnores } from 'eslint/config';
import tseslint from 'typescript-eslint';

export default defineConfig(
  globalIgnores(['dist/', 'node_modules/', 'coverage/', '.bench/', 'bench-results/']),
  js.configs.recommended,
  tseslint.configs.recommended,
  // The house's one rule about rooms: src/common is the leaf both sides share. The supervisor
  // side (src/ outside common) never imports the reader thread's code, and the reader thread
  // (workers/) imports nothing of src/ but src/common. Tests, bench and demo may use anything.
  {
    files: ['src/**/*.ts'],
    ignores: ['src/common/**'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: ['**/workers/**', '../workers/*', '../../workers/*'],
              message:
                'The supervisor side does not import the reader thread: share it through src/common.',
            },
          ],
        },
      ],
    },
  },
  {
    files: ['src/common/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: ['../*', '!../common/*', '**/workers/**'],
              message: 'src/common is a leaf: it imports only other src/common modules.',
            },
          ],
        },
      ],
    },
  },
  {
    files: ['workers/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: ['**/src/*', '!**/src/common', '**/src/*/**', '!**/src/common/**'],
              message: 'The reader thread imports only src/common from the supervisor side.',
            },
          ],
        },
      ],
    },
  },
  {
    rules: {
      // `_`-prefixed names mark parameters kept for a signature's sake.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_' },
      ],
    },
  },
);
