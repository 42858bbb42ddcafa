// What the end-to-end scripts share: the gatehouse binary they run, and starting it.

import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';

/** The binary under test: GATEHOUSE_BIN, or the debug build. */
export const bin = resolve(process.env.GATEHOUSE_BIN || 'target/debug/gatehouse');

/**
 * The server's environment: this one without GATEHOUSE_BIN, which names the binary here
 * but is an unknown setting to gatehouse (it refuses to start on one), plus `extra`.
 */
export function serverEnv(extra = {}) {
  const env = { ...process.env, GATEHOUSE_LOG: 'warn', ...extra };
  delete env.GATEHOUSE_BIN;
  return env;
}

/**
 * Starts `gatehouse serve` on a fresh data file in `dir`, on a loopback port with its
 * self-signed certificate, with `args` added: resolves to its child process, its URL and
 * its bootstrap admin token.
 */
export function startServer(dir, args = [], env = {}) {
  const child = spawn(bin, [
    'serve', '--data', join(dir, 'gatehouse.redb'), '--listen', '127.0.0.1:0', '--tls', 'self-signed',
    ...args,
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: serverEnv(env) });
  let out = '';
  return new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`the server did not start:\n${out}`)), 30000);
    const read = (chunk) => {
      out += chunk;
      const url = out.match(/gatehouse listening on (https:\/\/\S+)/);
      const token = out.match(/\b(gha_[A-Za-z0-9_-]+)/);
      if (url && token) {
        clearTimeout(timer);
        done({ child, url: url[1], token: token[1] });
      }
    };
    child.stdout.on('data', read);
    child.stderr.on('data', read);
    child.on('exit', (code) => fail(new Error(`the server exited (${code}):\n${out}`)));
  });
}
