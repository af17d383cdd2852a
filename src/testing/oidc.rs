//! SPIRE's OIDC Discovery Provider (built from the same SPIRE module as the server) serving
//! the trust domain's JWKS on loopback, and PyJWT verifying a JWT-SVID against it: the
//! chain Vault's JWT auth method uses (PI-57, PI-58), with a verifier nobody here wrote.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::spire::Spire;
use super::{Proc, free_port, peer, temp_dir, wait_until};

pub struct OidcProvider {
    _proc: Proc,
    _dir: tempfile::TempDir,
    port: u16,
}

impl OidcProvider {
    /// Serves `spire`'s JWT keys (read through the server API) on `http://localhost:<port>`.
    pub fn start(spire: &Spire) -> OidcProvider {
        let dir = temp_dir("oidc");
        let port = free_port();
        let config = format!(
            "log_level = \"DEBUG\"\n\
             domains = [\"localhost\"]\n\
             allow_insecure_scheme = true\n\
             insecure_addr = \"127.0.0.1:{port}\"\n\
             server_api {{\n  address = \"unix://{}\"\n  poll_interval = \"1s\"\n}}\n",
            spire.server_socket_path().display()
        );
        let config_path = dir.path().join("oidc.conf");
        std::fs::write(&config_path, config).expect("write oidc.conf");
        let mut cmd = Command::new(peer("oidc-discovery-provider"));
        cmd.arg("-config").arg(&config_path);
        let proc = Proc::spawn("oidc-discovery-provider", cmd, dir.path());
        let provider = OidcProvider {
            _proc: proc,
            _dir: dir,
            port,
        };
        wait_until(
            Duration::from_secs(30),
            "the OIDC provider serves its JWKS",
            || {
                provider
                    .jwks()
                    .ok()
                    .filter(|jwks| jwks.contains("\"keys\""))
            },
        );
        provider
    }

    pub fn jwks_url(&self) -> String {
        format!("http://localhost:{}/keys", self.port)
    }

    fn jwks(&self) -> Result<String, String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        super::http::get_with_host(addr, "/keys", "localhost")
            .map_err(|e| e.to_string())
            .map(|r| r.body)
    }

    /// Verifies the JWT-SVID in `token_file` for `audience` with PyJWT's JWKS client against
    /// this provider; the token's `sub` on success, PyJWT's error otherwise.
    pub fn verify(&self, token_file: &Path, audience: &str) -> Result<String, String> {
        let script = "import jwt, sys\n\
             token = open(sys.argv[1]).read().strip()\n\
             key = jwt.PyJWKClient(sys.argv[2]).get_signing_key_from_jwt(token)\n\
             claims = jwt.decode(token, key.key, algorithms=['ES256', 'ES384', 'RS256', 'PS256'], audience=sys.argv[3])\n\
             print(claims['sub'])\n";
        let out = Command::new(peer("python"))
            .arg("-c")
            .arg(script)
            .arg(token_file)
            .arg(self.jwks_url())
            .arg(audience)
            .output()
            .map_err(|e| format!("run python: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}
