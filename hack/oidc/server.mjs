// A Zitadel stand-in for development and tests, built on the OpenID-certified
// `oidc-provider`. Users, passwords and role grants come from a JSON file.
//
// Tokens carry roles in both shapes consumers meet in the wild:
// - Zitadel's nested claim `urn:zitadel:iam:org:project:roles` ({role: {orgId: domain}}),
//   always, as Zitadel emits it when the project asserts roles;
// - a flat `groups` array, produced by running the very Zitadel Action that the README
//   tells production users to install (deploy/zitadel/flat-groups.js). A user marked
//   `"zitadelAction": false` stands for a Zitadel where that Action is missing.
//
// Usage: node server.mjs --config users.json --cert server.crt --key server.key
//        [--host 127.0.0.1] [--port 0] [--ready-file F] [--id-token-ttl 300]
//        [--refresh-token-ttl 86400] [--client-redirect ID=URI ...]
// The bound address and issuer are written to --ready-file as JSON once the
// discovery document is served, so launchers need not parse logs.

import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import crypto from 'node:crypto';
import vm from 'node:vm';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const here = path.dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({
  options: {
    config: { type: 'string', default: path.join(here, 'users.json') },
    cert: { type: 'string' },
    key: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'ready-file': { type: 'string' },
    'id-token-ttl': { type: 'string', default: '300' },
    'refresh-token-ttl': { type: 'string', default: '86400' },
    'client-redirect': { type: 'string', multiple: true, default: [] },
    action: { type: 'string', default: path.join(here, '..', '..', 'deploy', 'zitadel', 'flat-groups.js') },
  },
});

function fail(message) {
  console.error(`oidc stand-in: ${message}`);
  process.exit(2);
}

if (!args.cert || !args.key) fail('--cert and --key are required (the provider serves HTTPS only)');
const config = JSON.parse(fs.readFileSync(args.config, 'utf8'));
const users = new Map(config.users.map((u) => [u.username, u]));
const org = config.org;

// Extra redirect URIs per client (e.g. a dashboard on a port chosen at start).
for (const pair of args['client-redirect']) {
  const eq = pair.indexOf('=');
  if (eq < 1) fail(`--client-redirect wants ID=URI, got ${pair}`);
  const client = config.clients.find((c) => c.client_id === pair.slice(0, eq));
  if (!client) fail(`--client-redirect names unknown client ${pair.slice(0, eq)}`);
  client.redirect_uris = [...(client.redirect_uris || []), pair.slice(eq + 1)];
}

// The Zitadel Action runs in a sandbox with Zitadel's Actions v1 calling shape:
// fn(ctx, api), roles in ctx.v1.user.grants, claims set through api.v1.claims.setClaim.
const actionSource = fs.readFileSync(args.action, 'utf8');
const actionName = (actionSource.match(/function\s+([A-Za-z0-9_]+)\s*\(/) || [])[1];
if (!actionName) fail(`no function found in ${args.action}`);
// A user's grants: the fleet project's roles, plus roles in other projects
// (`otherProjects`: {projectId: [roles]}), which Zitadel hands the Action too.
function grantsOf(user) {
  const grants = [];
  if (user.roles.length) grants.push({ projectId: org.projectId, roles: [...user.roles] });
  for (const [projectId, roles] of Object.entries(user.otherProjects || {})) grants.push({ projectId, roles: [...roles] });
  return grants;
}

function runZitadelAction(user) {
  const claims = {};
  const grants = grantsOf(user);
  const ctx = { v1: { user: { grants: { count: grants.length, grants } } } };
  const api = {
    v1: {
      claims: {
        setClaim(key, value) {
          // Zitadel neither overwrites a claim nor lets actions set its own urn: claims.
          if (key.startsWith('urn:zitadel:iam') || key in claims) return;
          claims[key] = value;
        },
      },
    },
  };
  const sandbox = { ctx, api };
  vm.runInNewContext(`${actionSource}\n;${actionName}(ctx, api);`, sandbox, { timeout: 1000 });
  return claims;
}

function claimsOf(user) {
  const nested = {};
  for (const role of user.roles) nested[role] = { [org.id]: org.domain };
  const fromAction = user.zitadelAction === false ? {} : runZitadelAction(user);
  // Zitadel never lets an Action overwrite a claim it set itself.
  return {
    ...fromAction,
    sub: user.username,
    email: user.email,
    email_verified: true,
    name: user.name,
    preferred_username: user.username,
    'urn:zitadel:iam:org:project:roles': nested,
  };
}

const ttl = (name) => {
  const n = Number(args[name]);
  if (!Number.isInteger(n) || n <= 0) fail(`--${name} must be a whole number of seconds`);
  return n;
};
const idTokenTtl = ttl('id-token-ttl');
const refreshTokenTtl = ttl('refresh-token-ttl');

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (title, body) => `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:16px/1.5 system-ui,sans-serif;max-width:26rem;margin:3rem auto;padding:0 1rem;color:#1d2430}
h1{font-size:1.4rem}label{display:block;margin:.6rem 0 .2rem}input{width:100%;padding:.5rem;box-sizing:border-box;font:inherit}
button{margin-top:1rem;padding:.5rem 1.2rem;font:inherit;cursor:pointer}.error{color:#a4000f}.note{color:#5a6472;font-size:.9rem}
</style></head><body><h1>${esc(title)}</h1>${body}
<p class="note">Development sign-in (Zitadel stand-in). Not for production.</p></body></html>`;

const loginForm = (uid, error, username = '') => page('Sign in to the fleet', `
${error ? `<p class="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<label for="username">Username</label><input id="username" name="username" value="${esc(username)}" autofocus required>
<label for="password">Password</label><input id="password" name="password" type="password" required>
<button type="submit">Sign in</button>
</form>`);

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString('utf8')));
}

const server = https.createServer({
  cert: fs.readFileSync(args.cert),
  key: fs.readFileSync(args.key),
});
server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  const issuer = `https://${args.host}:${port}`;
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

  const provider = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    findAccount(_ctx, id) {
      const user = users.get(id);
      if (!user) return undefined;
      return { accountId: id, claims: () => claimsOf(user) };
    },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups', 'urn:zitadel:iam:org:project:roles'],
    },
    // kube-apiserver reads email and groups from the ID token of a code flow, as
    // Zitadel does with "User Info inside ID Token" and "Assert Roles" switched on.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      deviceFlow: {
        enabled: true,
        userCodeInputSource(ctx, form, _out, err) {
          const error = err ? '<p class="error" role="alert">That code is not valid. Try again.</p>' : '';
          ctx.body = page('Connect a device', `${error}${form}
<label for="user_code">Code shown on your terminal</label>
<input id="user_code" name="user_code" form="op.deviceInputForm" autofocus required>
<button type="submit" form="op.deviceInputForm">Continue</button>`);
        },
        userCodeConfirmSource(ctx, form, client, _info, userCode) {
          ctx.body = page('Confirm the device', `
<p><strong>${esc(client.clientName || client.clientId)}</strong> asks to sign in with code <code>${esc(userCode)}</code>.</p>
${form}<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
        },
        successSource(ctx) {
          ctx.body = page('Signed in', '<p>You are signed in. Return to your terminal.</p>');
        },
      },
    },
    // Every client that may refresh gets a refresh token; Zitadel does the same when
    // offline_access is requested, which iotctl always does.
    issueRefreshToken: (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    ttl: {
      IdToken: idTokenTtl,
      AccessToken: idTokenTtl,
      RefreshToken: refreshTokenTtl,
      Grant: refreshTokenTtl,
      Session: refreshTokenTtl,
      Interaction: 600,
      DeviceCode: 600,
      AuthorizationCode: 60,
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Sign-in failed', Object.entries(out).map(([k, v]) => `<p><b>${esc(k)}</b>: ${esc(v)}</p>`).join(''));
    },
  });

  provider.use(async (ctx, next) => {
    const m = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
    if (!m) return next();
    ctx.set('cache-control', 'no-store');
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (m[2] && ctx.method === 'POST') {
      const form = await readForm(ctx.req);
      const user = users.get(form.username);
      const given = Buffer.from(String(form.password || ''));
      const want = Buffer.from(user ? user.password : crypto.randomBytes(16).toString('hex'));
      if (!user || given.length !== want.length || !crypto.timingSafeEqual(given, want)) {
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = loginForm(details.uid, 'Unknown user or wrong password.', form.username || '');
        return undefined;
      }
      const to = await provider.interactionResult(ctx.req, ctx.res, { login: { accountId: user.username } }, { mergeWithLastSubmission: false });
      ctx.status = 303;
      return ctx.redirect(to);
    }
    if (ctx.method !== 'GET') {
      ctx.status = 405;
      return undefined;
    }
    if (details.prompt.name === 'login') {
      ctx.type = 'html';
      ctx.body = loginForm(details.uid);
      return undefined;
    }
    // Consent: the fleet's own clients are first-party, so grant what was asked.
    const { prompt: { details: missing }, params, session } = details;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    const to = await provider.interactionResult(ctx.req, ctx.res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    ctx.status = 303;
    return ctx.redirect(to);
  });

  server.on('request', provider.callback());
  if (args['ready-file']) {
    const tmp = `${args['ready-file']}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify({ issuer, port, pid: process.pid }));
    fs.renameSync(tmp, args['ready-file']);
  }
  console.error(`oidc stand-in: issuer ${issuer}, ${users.size} users, ID tokens live ${idTokenTtl}s`);
});

for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => server.close(() => process.exit(0)));
