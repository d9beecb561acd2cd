// The identity provider of the sign-in tests: the certified npm `oidc-provider`,
// with its development login page (any password; the login name becomes the
// subject) and consent given on the user's behalf, as for a first-party app.
//
// It issues a refresh token with every code (rotated at each use, as strict
// providers do), so that the control plane can re-verify sessions. Test hooks, for
// the re-verification test:
//   DELETE /test/accounts/<id>            the account is gone: its refresh tokens
//                                         then get `invalid_grant`, as at a real IdP;
//   PUT    /test/accounts/<id>/groups?set=a,b   the account's `groups` claim;
//   GET    /test/accounts/<id>/refresh-tokens   every refresh token issued to it, so
//                                         that the test can look for them where
//                                         they must not be.
// And for the verifier's bench (`make bench-verifier`), which needs thousands of
// sessions without a browser:
//   POST   /test/mint?prefix=u&count=N    for accounts u0 … u<N-1>, a grant and a
//                                         refresh token each, made through the
//                                         provider's own Grant and RefreshToken
//                                         models as its code exchange makes them
//                                         (not bound to a browser session at the
//                                         IdP); answers [{account, refresh_token}].
//
// Environment: PORT, ISSUER (http://127.0.0.1:PORT), REDIRECT_URI (Vigil's
// callback), CLIENT_ID, CLIENT_SECRET; UNBOUNDED=1 keeps every artifact in
// memory (the provider's default store keeps the last 1,000 only, fewer than the
// bench's grants and tokens). Prints "READY" once it listens.
import Provider from 'oidc-provider';

const { PORT, ISSUER, REDIRECT_URI, CLIENT_ID, CLIENT_SECRET, UNBOUNDED } = process.env;
for (const [k, v] of Object.entries({ PORT, ISSUER, REDIRECT_URI, CLIENT_ID, CLIENT_SECRET })) {
  if (!v) {
    console.error(`idp: ${k} is not set`);
    process.exit(2);
  }
}

// Artifacts by `Model:id`, with when they expire (ms); secondary indexes for
// what the provider looks up other than by id.
function unboundedStore() {
  const entries = new Map();
  const grants = new Map();
  const sessionUids = new Map();
  const userCodes = new Map();
  return class UnboundedAdapter {
    constructor(model) {
      this.model = model;
    }

    key(id) {
      return `${this.model}:${id}`;
    }

    async upsert(id, payload, expiresIn) {
      const key = this.key(id);
      const expires = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
      entries.set(key, { payload, expires });
      if (payload.grantId) {
        if (!grants.has(payload.grantId)) {
          grants.set(payload.grantId, new Set());
        }
        grants.get(payload.grantId).add(key);
      }
      if (this.model === 'Session' && payload.uid) {
        sessionUids.set(payload.uid, id);
      }
      if (payload.userCode) {
        userCodes.set(payload.userCode, id);
      }
    }

    async find(id) {
      const key = this.key(id);
      const entry = entries.get(key);
      if (!entry) {
        return undefined;
      }
      if (entry.expires <= Date.now()) {
        entries.delete(key);
        return undefined;
      }
      return entry.payload;
    }

    async findByUid(uid) {
      const id = sessionUids.get(uid);
      return id === undefined ? undefined : this.find(id);
    }

    async findByUserCode(userCode) {
      const id = userCodes.get(userCode);
      return id === undefined ? undefined : this.find(id);
    }

    async consume(id) {
      const entry = entries.get(this.key(id));
      if (entry) {
        entry.payload.consumed = Math.floor(Date.now() / 1000);
      }
    }

    async destroy(id) {
      const key = this.key(id);
      const grantId = entries.get(key)?.payload.grantId;
      entries.delete(key);
      grants.get(grantId)?.delete(key);
    }

    async revokeByGrantId(grantId) {
      for (const key of grants.get(grantId) ?? []) {
        entries.delete(key);
      }
      grants.delete(grantId);
    }
  };
}

const deleted = new Set();
const groupsOf = new Map();
const issued = new Map();

const provider = new Provider(ISSUER, {
  clients: [
    {
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      redirect_uris: [REDIRECT_URI],
      // Where Vigil's sign-out comes back to after ending the session here.
      post_logout_redirect_uris: [REDIRECT_URI.replace(/\/\.vigil\/callback$/, '/.vigil/signed_out')],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
    },
  ],
  cookies: { keys: ['vigil-e2e-idp-cookie-key'] },
  ...(UNBOUNDED === '1' ? { adapter: unboundedStore() } : {}),
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  // Scope claims in the ID token itself (Vigil reads the ID token, not userinfo).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  // Without asking for `offline_access`: Vigil's sign-in asks for the provider's
  // configured scopes only.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: true,
  async findAccount(ctx, id) {
    if (deleted.has(id)) {
      return undefined;
    }
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.com`,
          email_verified: true,
          name: `Test user ${id}`,
          groups: groupsOf.get(id) ?? ['engineering'],
        };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId =
      ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      return ctx.oidc.provider.Grant.find(grantId);
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email profile groups');
    await grant.save();
    return grant;
  },
});

const SCOPE = 'openid email profile groups';

// A grant and a refresh token for each of `count` accounts, as a code exchange
// would leave them.
async function mint(prefix, count) {
  const client = await provider.Client.find(CLIENT_ID);
  const authTime = Math.floor(Date.now() / 1000);
  const minted = [];
  for (let i = 0; i < count; i += 1) {
    const accountId = `${prefix}${i}`;
    const grant = new provider.Grant({ clientId: CLIENT_ID, accountId });
    grant.addOIDCScope(SCOPE);
    const grantId = await grant.save();
    const token = new provider.RefreshToken({
      accountId,
      authTime,
      client,
      grantId,
      gty: 'authorization_code',
      scope: SCOPE,
    });
    minted.push({ account: accountId, refresh_token: await token.save() });
  }
  return minted;
}

provider.use(async (ctx, next) => {
  if (ctx.path === '/test/mint' && ctx.method === 'POST') {
    const count = Number(ctx.query.count);
    if (!ctx.query.prefix || !Number.isInteger(count) || count < 1) {
      ctx.status = 400;
      return undefined;
    }
    ctx.body = await mint(ctx.query.prefix, count);
    console.log(`idp: minted ${count} grants and refresh tokens`);
    return undefined;
  }
  const m = ctx.path.match(/^\/test\/accounts\/([^/]+)(\/groups|\/refresh-tokens)?$/);
  if (!m) {
    return next();
  }
  const id = decodeURIComponent(m[1]);
  if (ctx.method === 'DELETE' && !m[2]) {
    deleted.add(id);
    console.log(`idp: deleted account ${id}`);
    ctx.status = 204;
  } else if (ctx.method === 'GET' && m[2] === '/refresh-tokens') {
    ctx.body = issued.get(id) ?? [];
  } else if (ctx.method === 'PUT' && m[2] === '/groups') {
    const set = (ctx.query.set || '').split(',').filter(Boolean);
    groupsOf.set(id, set);
    console.log(`idp: account ${id} groups ${JSON.stringify(set)}`);
    ctx.status = 204;
  } else {
    ctx.status = 405;
  }
});
provider.on('grant.success', (ctx) => {
  const account = ctx.oidc.entities.Account?.accountId;
  const rt = ctx.body?.refresh_token;
  if (account && rt) {
    issued.set(account, [...(issued.get(account) ?? []), rt]);
  }
  if (ctx.oidc.params.grant_type === 'refresh_token') {
    console.log(`idp: refresh grant for ${ctx.oidc.entities.Account?.accountId}`);
  }
});
provider.on('grant.error', (ctx, err) => console.log(`idp: grant error ${err.error}: ${err.error_description}`));
provider.on('server_error', (ctx, err) => console.error('idp server_error', err));
provider.listen(Number(PORT), '127.0.0.1', () => console.log('READY'));
