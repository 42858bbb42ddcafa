//! `gatehouse storage copy`: a data file (or a backup) into an empty PostgreSQL database.
//!
//! The copy reads the file read-only, so it refuses a file a running server holds (its
//! writes would be missed): stop the server, or copy from a backup taken while it runs.
//! Rows go over as they are, sealed values included, in one transaction, and the
//! copy's row counts are checked against the file's.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use super::backup::{follow, progress_bar};
use crate::config::Config;
use crate::store::Store;

pub(super) async fn copy(from: Option<&Path>, to: &str, config: &Config) -> anyhow::Result<()> {
    let url = crate::config::storage_url(to).map_err(|reason| anyhow::anyhow!("--to: {reason}"))?;
    let source = from.map_or_else(|| config.data_path.clone(), Path::to_path_buf);
    if !source.exists() {
        anyhow::bail!(
            "nothing to copy: no data file at {} (name one with --from FILE)",
            source.display()
        );
    }
    if crate::store::in_use(&source)? {
        anyhow::bail!(
            "a running server holds {}: its writes during the copy would be missed. Stop it, \
             or take a backup (gatehouse backup FILE) and copy that with --from FILE",
            source.display()
        );
    }
    let target = crate::app::postgres_target(&url, &config.storage)?;
    let key = crate::store::seal::MasterKey::load(&config.master_key.path).with_context(|| {
        format!(
            "the copy opens {} with the master key ({}); give the right one with \
             --master-key-file",
            source.display(),
            config.master_key.path.display()
        )
    })?;
    let bar = progress_bar("copy");
    let mut progress = follow(&bar);
    let path = source.clone();
    let copied = tokio::task::spawn_blocking(move || {
        let store = Arc::new(Store::open_read_only(&path, &key)?);
        store.copy_to_postgres(&target, &mut progress)
    })
    .await?;
    bar.finish_and_clear();
    let counts = copied.with_context(|| format!("cannot copy {} into {url}", source.display()))?;
    let rows: u64 = counts.iter().map(|(_, n)| n).sum();
    println!(
        "copied {} ({rows} rows in {} tables) into {url}; serve it with --storage {url} \
         and the same master key",
        source.display(),
        counts.len()
    );
    Ok(())
}
