// The identity provider of the sign-in tests: the certified npm `oidc-provider`,
// with its development login page (any password; the login name becomes the
// subject) and consent given on the user's behalf, as for a first-party app.
//
// Environment: PORT, ISSUER (http://127.0.0.1:PORT), REDIRECT_URI (Vigil's
// callback), CLIENT_ID, CLIENT_SECRET. Prints "READY" once it listens.
import Provider from 'oidc-provider';

const { PORT, ISSUER, REDIRECT_URI, CLIENT_ID, CLIENT_SECRET } = process.env;
for (const [k, v] of Object.entries({ PORT, ISSUER, REDIRECT_URI, CLIENT_ID, CLIENT_SECRET })) {
  if (!v) {
    console.error(`idp: ${k} is not set`);
    process.exit(2);
  }
}

const provider = new Provider(ISSUER, {
  clients: [
    {
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      redirect_uris: [REDIRECT_URI],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
  ],
  cookies: { keys: ['vigil-e2e-idp-cookie-key'] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  // Scope claims in the ID token itself (Vigil reads the ID token, not userinfo).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.com`,
          email_verified: true,
          name: `Test user ${id}`,
          groups: ['engineering'],
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

provider.on('server_error', (ctx, err) => console.error('idp server_error', err));
provider.listen(Number(PORT), '127.0.0.1', () => console.log('READY'));
