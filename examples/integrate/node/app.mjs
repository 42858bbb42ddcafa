// A small Express app whose routes need a gatehouse device token.
//
// Run: AUTH_ISSUER=https://auth.example.com node app.mjs   (PORT, default 8000; 0 picks a
// free port). It prints "listening on http://127.0.0.1:PORT" once it accepts requests.

import express from 'express';
import { gatehouseAuthFromEnv } from './gatehouse-auth.mjs';

const { requireDevice, requireLiveDevice } = gatehouseAuthFromEnv();
const app = express();
app.disable('x-powered-by');

const whoami = (req, res) =>
  res.json({ device_id: req.device.id, token_id: req.device.tokenId, expires_at: req.device.expiresAt });

// Offline check: fast, but a revoked token still passes until it expires.
app.get('/me', requireDevice, whoami);
// Introspection: a revoked token, family, device or key is refused at once.
app.get('/me/live', requireLiveDevice, whoami);
// Authorization is the app's own: a device reads only its own notes (else 403).
app.get('/devices/:id/notes', requireDevice, (req, res) => {
  if (req.params.id !== req.device.id) {
    return res.status(403).json({ error: 'a device may read only its own notes' });
  }
  return res.json({ device_id: req.params.id, notes: [] });
});

const server = app.listen(Number(process.env.PORT ?? 8000), '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
