/**
 * Zitadel Action (Actions v1) that gives the Kubernetes API server a flat `groups`
 * claim. kube-apiserver's --oidc-groups-claim accepts a string or an array of
 * strings; Zitadel's own roles claim (urn:zitadel:iam:org:project:roles) is an
 * object keyed by role, which the API server cannot read.
 *
 * Install: Zitadel console -> Actions -> New, name it `flatGroups` (the name must
 * match the function), paste this file. Then Flows -> Complement Token, and add it
 * to both triggers: "Pre Userinfo creation" (ID token and userinfo) and
 * "Pre access token creation". Tokens then carry, e.g.
 *   "groups": ["fleet-deployers"]
 * which the API server prefixes to `oidc:fleet-deployers` and the chart's
 * sso.groups.* values bind to the iot-fleet-* ClusterRoles.
 *
 * Only roles of the fleet's own project count: a user's grants span every project
 * they belong to, and a role of the same name elsewhere must not reach the
 * cluster. Set FLEET_PROJECT_ID to your iot-fleet project's id.
 *
 * The local stand-in (hack/oidc) runs this same file for every login, so the tests
 * pin what this Action emits.
 */
var FLEET_PROJECT_ID = '300000000000000100';

function flatGroups(ctx, api) {
  var grants = ctx.v1.user.grants;
  if (grants === undefined || grants.count === 0) {
    return;
  }
  var groups = [];
  grants.grants.forEach(function (grant) {
    if (grant.projectId !== FLEET_PROJECT_ID) {
      return;
    }
    grant.roles.forEach(function (role) {
      if (groups.indexOf(role) === -1) {
        groups.push(role);
      }
    });
  });
  api.v1.claims.setClaim('groups', groups);
}
