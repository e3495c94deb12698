//! The embedded store's files are private (issue 14, Docker): a data folder that
//! pre-exists with 0755 (made by an image, a volume or by hand) leaves every file in it
//! readable by its owner only, including files made before this start.

use std::os::unix::fs::PermissionsExt;

use secrecy::ExposeSecret;
use tokenlease::crypto::KeyRing;

use super::helpers::{Counters, Db, TestEnv};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Pre-create the folder 0755 and a world-readable master key file in it, start the
/// embedded server: the database (and its WAL files), the master key file and the
/// bootstrap admin key are 0600.
#[tokio::test]
async fn data_files_are_private_in_a_folder_made_0755() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let data = env.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = KeyRing::generate_key_base64();
    let key_file = data.join("master.key");
    std::fs::write(
        &key_file,
        format!("active=k1\nk1={}\n", key.expose_secret()),
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut settings = env.settings();
    settings.data_dir = data.clone();
    // The embedded key file, as a plain `tokenlease serve` uses it.
    settings.encryption = Default::default();
    let app = env.spawn_with(settings).await;
    app.admin().await; // serving
    let mut files = vec!["tokenlease.db", "master.key", "admin.key"];
    for optional in ["tokenlease.db-wal", "tokenlease.db-shm"] {
        if data.join(optional).exists() {
            files.push(optional);
        }
    }
    for name in files {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
    app.stop().await;
}
