// A real OpenID Connect provider (panva's oidc-provider) for weft's
// end-to-end tests. It listens on loopback and is driven over plain HTTP:
// the login "page" is `GET /interaction/UID?user=NAME`, which logs NAME in
// and grants every requested scope, so a test needs no browser.
//
// Environment:
//   WEFT_OIDC_PORT           port on 127.0.0.1
//   WEFT_OIDC_CLIENTS        JSON array of {id, secret, redirect_uri}
//   WEFT_OIDC_USERS          path of a JSON file {"NAME": {"email", "groups"}},
//                            read at every login so a test can change groups
import fs from 'node:fs';
import http from 'node:http';

import Provider from 'oidc-provider';

const port = Number(process.env.WEFT_OIDC_PORT);
const clients = JSON.parse(process.env.WEFT_OIDC_CLIENTS ?? '[]');
const usersFile = process.env.WEFT_OIDC_USERS;
if (!port || clients.length === 0 || !usersFile) {
  console.error('set WEFT_OIDC_PORT, WEFT_OIDC_CLIENTS and WEFT_OIDC_USERS');
  process.exit(2);
}

function users() {
  return JSON.parse(fs.readFileSync(usersFile, 'utf8'));
}

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: clients.map((c) => ({
    client_id: c.id,
    client_secret: c.secret,
    redirect_uris: [c.redirect_uri],
    grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  async findAccount(ctx, id) {
    const user = users()[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: user.email, email_verified: true, groups: user.groups ?? [] };
      },
    };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  scopes: ['openid', 'email', 'groups'],
  // Put the scope's claims into the ID token itself, as IdPs configured for
  // weft do, rather than only into the userinfo response.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  cookies: { keys: ['weft-test-provider-cookies'] },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
});

async function interaction(req, res) {
  const url = new URL(req.url, issuer);
  const name = url.searchParams.get('user');
  const details = await provider.interactionDetails(req, res);
  if (!name) {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`log in: GET ${url.pathname}?user=NAME\n`);
    return;
  }
  if (!users()[name]) {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: `no such test user ${name}`,
    });
    return;
  }
  const grant = new provider.Grant({ accountId: name, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  const grantId = await grant.save();
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId: name }, consent: { grantId } },
    { mergeWithLastSubmission: false },
  );
}

const handler = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((err) => {
      res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(`interaction failed: ${err.message}\n`);
    });
    return;
  }
  handler(req, res);
});
server.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
