//! The backend registry by URL scheme (`custody::drivers`, `custody::open_admin`)
//! and what the `custody` command makes of a `--db` value through it: an
//! unknown scheme is an error naming the accepted forms, a missing SQLite
//! file is an error naming the path and is not created, and both backends
//! open.

use std::process::Command;

use custody::{Access, Admin};

fn custody(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(args)
        .env_remove("CUSTODY_DB")
        .env_remove("CUSTODY_CONFIG")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn temp_dir(tag: &str) -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("custody-{tag}-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[test]
fn the_registry_knows_both_backends() {
    let names: Vec<&str> = custody::drivers().iter().map(|d| d.name).collect();
    assert_eq!(names, ["postgres", "sqlite"]);
}

#[tokio::test]
async fn an_unknown_scheme_names_the_accepted_forms() -> anyhow::Result<()> {
    for url in [
        "mysql://app:secret@127.0.0.1:3306/shop",
        "http://example.com/db",
    ] {
        for access in [Access::Existing, Access::Migrate] {
            let Err(e) = custody::open_admin(url, access).await else {
                panic!("{url} opened")
            };
            let text = e.to_string();
            for form in ["postgres://", "postgresql://", "sqlite://", "a file path"] {
                assert!(text.contains(form), "{text}");
            }
            assert!(!text.contains("secret"), "password shown: {text}");
        }
    }
    // and through the command, for reading and for writing commands
    for args in [
        &[
            "dlq",
            "list",
            "--db",
            "mysql://app:secret@127.0.0.1:3306/shop",
        ][..],
        &["migrate", "--db", "mysql://app:secret@127.0.0.1:3306/shop"][..],
        &[
            "trace",
            "0193b6f2-4a3c-7d3e-9f00-000000000001",
            "--db",
            "http://example.com/x",
        ][..],
    ] {
        let (code, out, err) = custody(args)?;
        assert_ne!(code, 0, "{args:?}: {out}{err}");
        assert!(
            err.contains("accepted: ") && err.contains("postgres://") && err.contains("sqlite://"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("secret"), "{args:?}: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_sqlite_file_is_an_error_and_is_not_created() -> anyhow::Result<()> {
    let dir = temp_dir("registry")?;
    for (i, form) in ["{}", "sqlite://{}", "sqlite:{}"].iter().enumerate() {
        let path = dir.join(format!("missing-{i}.db"));
        let url = form.replace("{}", &path.to_string_lossy());
        let Err(e) = custody::open_admin(&url, Access::Existing).await else {
            panic!("{url} opened")
        };
        let text = e.to_string();
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.contains(&*path.to_string_lossy()), "{text}");
        assert!(!path.exists(), "{url} was created");
        let (code, out, err) = custody(&["dlq", "list", "--db", &url])?;
        assert_ne!(code, 0, "{out}{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(!path.exists(), "custody dlq list created {url}");
    }
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0, "files were created");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn empty_admin(admin: &dyn Admin, backend: &str) -> anyhow::Result<()> {
    assert_eq!(admin.backend(), backend);
    assert!(admin.dead_letters().await?.is_empty());
    assert!(!admin.topic_seen("orders").await?);
    assert!(admin.topics(10).await?.is_empty());
    assert_eq!(admin.checkpoint("billing").await?, None);
    Ok(())
}

#[tokio::test]
async fn both_backends_open_for_writing_then_as_they_are() -> anyhow::Result<()> {
    let dir = temp_dir("registry")?;
    let path = dir.join("a.db").to_string_lossy().into_owned();
    for url in [path.clone(), format!("sqlite://{path}")] {
        empty_admin(
            custody::open_admin(&url, Access::Migrate).await?.as_ref(),
            "sqlite",
        )
        .await?;
        empty_admin(
            custody::open_admin(&url, Access::Existing).await?.as_ref(),
            "sqlite",
        )
        .await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let Some(pg) = custody_testkit::postgres_db().await? else {
        return Ok(());
    };
    // a fresh database has no custody tables: reading refuses it untouched
    let Err(e) = custody::open_admin(&pg.url, Access::Existing).await else {
        panic!("a database without custody tables opened for reading")
    };
    assert!(e.to_string().contains("has no custody tables"), "{e}");
    empty_admin(
        custody::open_admin(&pg.url, Access::Migrate)
            .await?
            .as_ref(),
        "postgres",
    )
    .await?;
    let alt = pg.url.replacen("postgres://", "postgresql://", 1);
    empty_admin(
        custody::open_admin(&alt, Access::Existing).await?.as_ref(),
        "postgres",
    )
    .await?;
    Ok(())
}
