// A real gatehouse for the tests: a fresh server on a temporary data file, with a clean
// environment (no inherited GATEHOUSE_* variable, an empty configuration file), its
// CLI, and its admin API over HTTPS trusting exactly its certificate.
//
// The binary is TEST_GATEHOUSE_BIN (default ../../target/debug/gatehouse).

import { execFile, spawn } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import tls from 'node:tls';
import { promisify } from 'node:util';

const run = promisify(execFile);
const here = new URL('.', import.meta.url).pathname;
export const binary = resolve(process.env.TEST_GATEHOUSE_BIN ?? join(here, '../../../target/debug/gatehouse'));

function cleanEnv(extra) {
  const env = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (name.startsWith('GATEHOUSE_') || name === 'CREDENTIALS_DIRECTORY' || name === 'STATE_DIRECTORY') continue;
    env[name] = value;
  }
  return { ...env, ...extra };
}

/** Starts a server; `settings` are extra GATEHOUSE_* variables. */
export async function startServer(settings = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-client-test-'));
  writeFileSync(join(dir, 'gatehouse.toml'), '');
  const data = join(dir, 'gatehouse.redb');
  const env = cleanEnv({
    GATEHOUSE_CONFIG: join(dir, 'gatehouse.toml'),
    GATEHOUSE_LOG: 'warn',
    GATEHOUSE_LOG_FORMAT: 'text',
    // Many pairings from one address in a few seconds.
    GATEHOUSE_RATELIMIT_PAIRING: 'off',
    ...settings,
  });
  const server = {
    dir,
    url: '',
    port: 0,
    pin: '',
    ca: '',
    adminToken: '',
    process: undefined,
    output: '',
  };

  async function launch(listen) {
    const child = spawn(binary, ['--data', data, 'serve', '--listen', listen], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    server.process = child;
    let output = '';
    child.stdout.on('data', (chunk) => (output += chunk));
    child.stderr.on('data', (chunk) => (server.output += chunk));
    const deadline = Date.now() + 30_000;
    for (;;) {
      const url = /^gatehouse listening on (https:\/\/[0-9.:]+)/m.exec(output);
      if (url) {
        server.url = url[1];
        server.port = Number(new URL(url[1]).port);
        const token = /^\s*(gha_[A-Za-z0-9_-]+)/m.exec(output);
        if (token) server.adminToken = token[1];
        const pin = /SPKI pin (sha256\/[A-Za-z0-9+/=]+)/.exec(output);
        if (pin) server.pin = pin[1];
        break;
      }
      if (child.exitCode !== null) throw new Error(`gatehouse exited: ${output}${server.output}`);
      if (Date.now() > deadline) throw new Error(`gatehouse did not start: ${output}${server.output}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  await launch('127.0.0.1:0');
  // The served certificate, as PEM: the only CA for the tests' own admin calls.
  const [host, port] = server.url.slice('https://'.length).split(':');
  server.ca = await new Promise((resolvePem, reject) => {
    const socket = tls.connect({ host, port: Number(port), rejectUnauthorized: false }, () => {
      const x509 = new X509Certificate(socket.getPeerCertificate(true).raw);
      socket.end();
      resolvePem(x509.toString());
    });
    socket.on('error', reject);
  });

  /** Runs a CLI command against this server (over its admin socket). */
  server.cli = async (...args) => {
    const { stdout } = await run(binary, ['--data', data, ...args], { env });
    return stdout;
  };

  /** Opens a pairing session with the CLI and returns its pairing URI. */
  server.pairingUri = async (name = 'test', ttl) => {
    const stdout = await server.cli('pair', 'new', '--name', name, ...(ttl ? ['--ttl', ttl] : []));
    return stdout.trim().split('\n').at(-1);
  };

  /** An HTTPS request to this server, trusting exactly its certificate. */
  server.request = (method, path, { body, headers = {}, admin = false } = {}) =>
    new Promise((resolveResponse, reject) => {
      const req = https.request(
        `${server.url}${path}`,
        {
          method,
          ca: server.ca,
          headers: { ...headers, ...(admin ? { authorization: `Bearer ${server.adminToken}` } : {}) },
        },
        (res) => {
          let text = '';
          res.on('data', (chunk) => (text += chunk));
          res.on('end', () => resolveResponse({ status: res.statusCode, headers: res.headers, text }));
        },
      );
      req.on('error', reject);
      req.end(body);
    });

  /** Whether the server says a token is active (introspection as the admin). */
  server.active = async (token) => {
    const res = await server.request('POST', '/v1/introspect', {
      admin: true,
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token }).toString(),
    });
    if (res.status !== 200) throw new Error(`introspection answered ${res.status}: ${res.text}`);
    return JSON.parse(res.text).active;
  };

  /** Audit events of one type for one device (the server's own record of what happened). */
  server.audit = async (type, device) => {
    const stdout = await server.cli('audit', 'search', '--type', type, '--device', device, '--json');
    return stdout.split('\n').filter((line) => line.trim() !== '').map((line) => JSON.parse(line));
  };

  async function stopProcess() {
    const child = server.process;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }

  /** Stops the server and starts it again on the same port, with the same data. */
  server.restart = async () => {
    await stopProcess();
    await launch(`127.0.0.1:${server.port}`);
  };

  server.stop = async () => {
    await stopProcess();
    rmSync(dir, { recursive: true, force: true });
  };
  return server;
}
