//! The coordinator end to end on a real local cluster: psql, tokio-postgres and pgbench
//! through a CN; DDL by two-phase commit seen through the other CN and on every DN
//! primary; a differential check against one plain PostgreSQL; 0A000 for unsupported
//! shapes; a CN killed after the decision is finished by the resolver on restart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mpp_ha_tests::{connect, kill9, pgbench, wait_for, LocalCluster};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio_postgres::SimpleQueryMessage;

const PORT_BASE: u16 = 14000;

async fn cn_client(port: u16) -> Result<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(mpp_ha_tests::cn_login()?.1)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(10), cfg.connect(tokio_postgres::NoTls))
            .await
            .context("connect to CN timed out")??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn wait_cn(port: u16) -> Result<tokio_postgres::Client> {
    wait_for(
        "CN accepting clients",
        Duration::from_secs(30),
        || async move {
            let c = cn_client(port).await?;
            c.simple_query("select 1").await?;
            Ok(Some(c))
        },
    )
    .await
}

/// Text rows of a simple query.
async fn rows(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let msgs = c
        .simple_query(sql)
        .await
        .map_err(|e| anyhow::anyhow!("{sql}: {e:?}"))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).map(|s| s.to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

async fn scalar(c: &tokio_postgres::Client, sql: &str) -> Result<String> {
    rows(c, sql)
        .await?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .with_context(|| format!("{sql}: no value"))
}

/// The DN members that are primaries right now (not in recovery).
async fn dn_primaries(c: &LocalCluster) -> Vec<(String, tokio_postgres::Client)> {
    let mut out = Vec::new();
    for g in &c.cfg.dn_groups {
        for m in &g.members {
            if m.role() == Some(ha_common::Role::Secondary) {
                continue;
            }
            let Ok(client) = connect(m.port(), Duration::from_secs(3)).await else {
                continue;
            };
            if let Ok(r) = scalar(&client, "select pg_is_in_recovery()::text").await {
                if r == "false" {
                    out.push((m.name.clone(), client));
                }
            }
        }
    }
    out
}

fn psql(port: u16, script: &str, dir: &Path) -> Result<String> {
    let path = dir.join("script.sql");
    std::fs::write(&path, script)?;
    let out = Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
        ])
        .arg(&path)
        .env("PGPASSWORD", mpp_ha_tests::cn_login()?.1)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "psql failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Values compared as PostgreSQL text, numbers compared as numbers (avg's scale is
/// the CN's choice: 16 fractional digits).
fn normalise(rows: Vec<Vec<Option<String>>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| match v {
                    None => "NULL".to_owned(),
                    Some(s) => match s.parse::<f64>() {
                        Ok(f) => format!("{f:.6}"),
                        Err(_) => s,
                    },
                })
                .collect()
        })
        .collect()
}

/// A client connection whose `application_name` as the server last reported it (by
/// ParameterStatus) is watched.
async fn reported_client(
    port: u16,
) -> Result<(
    tokio_postgres::Client,
    tokio::sync::watch::Receiver<Option<String>>,
)> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(mpp_ha_tests::cn_login()?.1)
        .dbname("postgres");
    let (client, mut conn) = cfg.connect(tokio_postgres::NoTls).await?;
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        loop {
            let polled = futures::future::poll_fn(|cx| {
                let p = conn.poll_message(cx);
                tx.send_replace(conn.parameter("application_name").map(str::to_owned));
                p
            })
            .await;
            if !matches!(polled, Some(Ok(_))) {
                break;
            }
        }
    });
    Ok((client, rx))
}

/// Reads backend messages from `sock` until `stop` matches one; returns them all.
async fn read_until(
    sock: &mut tokio::net::TcpStream,
    buf: &mut bytes::BytesMut,
    stop: impl Fn(&backend::Message) -> bool,
) -> Result<Vec<backend::Message>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(m) = backend::Message::parse(buf)? {
            let done = stop(&m);
            out.push(m);
            if done {
                return Ok(out);
            }
        }
        let n = tokio::time::timeout_at(deadline, sock.read_buf(buf))
            .await
            .context("no reply from the CN within 10 s")??;
        if n == 0 {
            bail!("the CN closed the connection");
        }
    }
}

fn kind(m: &backend::Message) -> &'static str {
    match m {
        backend::Message::ParseComplete => "ParseComplete",
        backend::Message::BindComplete => "BindComplete",
        backend::Message::DataRow(_) => "DataRow",
        backend::Message::CommandComplete(_) => "CommandComplete",
        backend::Message::ReadyForQuery(_) => "ReadyForQuery",
        backend::Message::ErrorResponse(_) => "ErrorResponse",
        _ => "other",
    }
}

/// A raw protocol connection to the CN, logged in and ready for a query.
async fn raw_login(port: u16) -> Result<(tokio::net::TcpStream, bytes::BytesMut)> {
    use tokio::io::AsyncWriteExt;
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut out = bytes::BytesMut::new();
    let mut buf = bytes::BytesMut::new();
    let (user, password) = mpp_ha_tests::cn_login()?;
    frontend::startup_message(
        [("user", user.as_str()), ("database", "postgres")],
        &mut out,
    )?;
    sock.write_all(&out.split()).await?;
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    loop {
        let msgs = read_until(&mut sock, &mut buf, |m| {
            !matches!(m, backend::Message::ParameterStatus(_))
        })
        .await?;
        match msgs.last() {
            Some(backend::Message::AuthenticationSasl(_)) => {
                frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out)?
            }
            Some(backend::Message::AuthenticationSaslContinue(b)) => {
                scram.update(b.data())?;
                frontend::sasl_response(scram.message(), &mut out)?;
            }
            Some(backend::Message::AuthenticationSaslFinal(b)) => scram.finish(b.data())?,
            Some(backend::Message::ReadyForQuery(_)) => break,
            Some(backend::Message::ErrorResponse(_)) => bail!("startup refused"),
            _ => {}
        }
        if !out.is_empty() {
            sock.write_all(&out.split()).await?;
        }
    }
    Ok((sock, buf))
}

/// The type OIDs of the RowDescription a simple Query of `sql` gets from the CN (what
/// node-postgres and psycopg map values by).
async fn simple_query_types(port: u16, sql: &str) -> Result<Vec<u32>> {
    use tokio::io::AsyncWriteExt;
    let (mut sock, mut buf) = raw_login(port).await?;
    let mut out = bytes::BytesMut::new();
    frontend::query(sql, &mut out)?;
    sock.write_all(&out.split()).await?;
    let msgs = read_until(&mut sock, &mut buf, |m| {
        matches!(m, backend::Message::ReadyForQuery(_))
    })
    .await?;
    for m in &msgs {
        match m {
            backend::Message::RowDescription(d) => {
                use fallible_iterator::FallibleIterator;
                let fields: Vec<backend::Field> = d.fields().collect()?;
                return Ok(fields.iter().map(|f| f.type_oid()).collect());
            }
            backend::Message::ErrorResponse(_) => bail!("{sql}: the CN answered an error"),
            _ => {}
        }
    }
    bail!("{sql}: no RowDescription")
}

/// Result columns of simple-protocol queries carry the DN's own types, also for rows
/// merged from several groups (aggregates as PostgreSQL types them).
async fn simple_query_column_types(port: u16) -> Result<()> {
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    const TEXT: u32 = 25;
    const NUMERIC: u32 = 1700;
    let cases: [(&str, &[u32]); 6] = [
        (
            "select 1::int4 as a, 'x'::text as b, 2.5::numeric as c",
            &[INT4, TEXT, NUMERIC],
        ),
        ("select id, v from wide where id = 3", &[INT8, INT4]),
        ("select id, v from wide order by id limit 2", &[INT8, INT4]),
        ("select count(*) from wide", &[INT8]),
        (
            "select count(*), sum(v), avg(v), max(id) from wide",
            &[INT8, INT8, NUMERIC, INT8],
        ),
        (
            "select v, count(*) from wide group by v having count(*) > 0",
            &[INT4, INT8],
        ),
    ];
    for (sql, want) in cases {
        assert_eq!(simple_query_types(port, sql).await?, want, "{sql}");
    }
    Ok(())
}

/// The CN writes an extended-protocol round trip's replies at Flush or Sync (as
/// PostgreSQL does), not per message: a client that sends Flush gets everything so far
/// without ReadyForQuery, and Sync then ends the round trip.
async fn flush_and_sync(port: u16) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (mut sock, mut buf) = raw_login(port).await?;
    let mut out = bytes::BytesMut::new();
    frontend::parse("", "select $1::int + 1", [], &mut out)?;
    frontend::bind(
        "",
        "",
        [0],
        ["41"],
        |v, b| {
            b.extend_from_slice(v.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [0],
        &mut out,
    )
    .map_err(|_| anyhow::anyhow!("bind message"))?;
    frontend::execute("", 0, &mut out)?;
    frontend::flush(&mut out);
    sock.write_all(&out.split()).await?;
    let msgs = read_until(&mut sock, &mut buf, |m| {
        matches!(
            m,
            backend::Message::CommandComplete(_) | backend::Message::ErrorResponse(_)
        )
    })
    .await?;
    let kinds: Vec<&str> = msgs.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "ParseComplete",
            "BindComplete",
            "DataRow",
            "CommandComplete"
        ],
        "replies to Parse/Bind/Execute/Flush"
    );
    if let Some(backend::Message::DataRow(row)) = msgs.get(2) {
        // One column: its length (2), then "42".
        assert_eq!(row.buffer(), b"\0\0\0\x0242", "the row of select 41 + 1");
    }
    frontend::sync(&mut out);
    sock.write_all(&out.split()).await?;
    let msgs = read_until(&mut sock, &mut buf, |m| {
        matches!(m, backend::Message::ReadyForQuery(_))
    })
    .await?;
    assert_eq!(msgs.iter().map(kind).collect::<Vec<_>>(), ["ReadyForQuery"]);
    Ok(())
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

async fn protocol_checks(port: u16, client: &tokio_postgres::Client) -> Result<()> {
    // A query string of several statements (drivers' batch_execute): each is planned
    // when the ones before it have run, so a table created first can be written next.
    client
        .batch_execute(
            "create table ms (id int primary key, v int); \
             insert into ms values (1, 1), (2, 2), (3, 3); select count(*) from ms",
        )
        .await?;
    assert_eq!(scalar(client, "select sum(v) from ms").await?, "6");
    // One implicit transaction around the string: the error rolls back the writes
    // before it (on every group) and skips the statements after it.
    let e = client
        .batch_execute(
            "insert into ms values (4, 4), (5, 5), (6, 6); insert into ms values (1, 9); \
             insert into ms values (7, 7)",
        )
        .await
        .err()
        .context("a duplicate key in a query string was accepted")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(
        rows(client, "select count(*), sum(v) from ms").await?,
        vec![vec![Some("3".to_owned()), Some("6".to_owned())]]
    );
    // Its own COMMIT ends the implicit transaction: what came before stays.
    let e = client
        .batch_execute("insert into ms values (4, 4), (5, 5); commit; insert into ms values (1, 9)")
        .await
        .err()
        .context("a duplicate key after COMMIT was accepted")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    assert_eq!(scalar(client, "select sum(v) from ms").await?, "15");
    client
        .batch_execute("create table sp (id int primary key, v int)")
        .await?;
    client
        .batch_execute("insert into sp values (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0)")
        .await?;
    // A savepoint taken before any group is touched; ROLLBACK TO undoes writes on
    // every group, also on groups the transaction enlisted after the savepoint.
    client
        .batch_execute(
            "begin; savepoint a; update sp set v = 1; rollback to savepoint a; \
             update sp set v = 2 where id = 1; savepoint b; release savepoint b; commit",
        )
        .await?;
    assert_eq!(scalar(client, "select sum(v) from sp").await?, "2");
    // ROLLBACK TO rescues a transaction after the DN's error; the error is the DN's own.
    client.batch_execute("begin").await?;
    client.batch_execute("insert into sp values (7, 7)").await?;
    client.batch_execute("savepoint s").await?;
    let e = client
        .batch_execute("insert into sp values (1, 9)")
        .await
        .err()
        .context("a duplicate key was accepted")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("23505"), "{e}");
    let msg = e.as_db_error().map(|d| d.message().to_owned());
    assert!(
        msg.as_deref()
            .is_some_and(|m| m.starts_with("duplicate key value violates unique constraint")),
        "not the DN's message: {msg:?}"
    );
    let e = client
        .batch_execute("insert into sp values (8, 8)")
        .await
        .err()
        .context("a statement ran in an aborted transaction")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{e}");
    client.batch_execute("rollback to savepoint s").await?;
    client.batch_execute("insert into sp values (8, 8)").await?;
    client.batch_execute("commit").await?;
    assert_eq!(
        rows(client, "select count(*), sum(v) from sp").await?,
        vec![vec![Some("8".to_owned()), Some("17".to_owned())]]
    );
    let e = client
        .batch_execute("savepoint outside")
        .await
        .err()
        .context("SAVEPOINT outside a transaction block succeeded")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("25P01"), "{e}");

    // A cancel request (its own connection, the session's BackendKeyData) stops the
    // statement on the DN: the client gets the DN's 57014 long before it would end.
    let sleeper_client = cn_client(port).await?;
    let token = sleeper_client.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        sleeper_client
            .simple_query("select pg_sleep(60)")
            .await
            .map(|_| ())
    });
    // The statement may not have reached the DN yet: cancel until it ends.
    wait_for(
        "the cancelled statement to end",
        Duration::from_secs(30),
        || {
            let token = token.clone();
            let done = sleeper.is_finished();
            async move {
                if done {
                    return Ok(Some(()));
                }
                token.cancel_query(tokio_postgres::NoTls).await?;
                Ok(None)
            }
        },
    )
    .await?;
    let e = sleeper
        .await?
        .err()
        .context("pg_sleep(60) was not cancelled")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(40));

    // ParameterStatus after SET of a reported setting, as PostgreSQL sends it.
    let (reporter, mut reported) = reported_client(port).await?;
    reporter
        .batch_execute("set application_name = 'cn-protocol-check'")
        .await?;
    wait_for(
        "ParameterStatus application_name",
        Duration::from_secs(5),
        || {
            let v = reported.borrow_and_update().clone();
            async move { Ok((v.as_deref() == Some("cn-protocol-check")).then_some(())) }
        },
    )
    .await?;
    assert_eq!(
        scalar(&reporter, "show application_name").await?,
        "cn-protocol-check"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cn_serves_sql_ddl_2pc_pgbench_and_matches_plain_postgres() -> Result<()> {
    let c = LocalCluster::new("cn-coordinator", PORT_BASE);
    c.up(150)?;
    let cn1_port = c.port("cn1");
    let cn2_port = c.port("cn2");
    let client = wait_cn(cn1_port).await.with_context(|| c.logs())?;
    let client2 = wait_cn(cn2_port).await?;

    // 1. A psql script: DDL, inserts, selects, a transaction, COPY.
    let out = psql(
        cn1_port,
        "create table items (id int primary key, grp int, name text);\n\
         create table kinds (k int, label text) distribute by replication;\n\
         insert into kinds values (1, 'one'), (2, 'two'), (3, 'three');\n\
         insert into items values (1, 1, 'a'), (2, 2, 'b'), (3, 3, 'c'), (4, 1, 'd');\n\
         begin;\n\
         insert into items values (5, 2, 'e'), (6, 3, 'f'), (7, 1, 'g');\n\
         update items set name = 'A' where id = 1;\n\
         commit;\n\
         copy items from stdin;\n\
         8\t2\th\n\
         9\t3\ti\n\
         10\t1\tj\n\
         \\.\n\
         select count(*) as n from items;\n\
         select name from items where id = 1;\n\
         select i.id, k.label from items i join kinds k on i.grp = k.k order by i.id limit 3;\n",
        c.dir.path(),
    )?;
    for want in [
        "CREATE TABLE",
        "COMMIT",
        "COPY 3",
        " 10\n",
        " A\n",
        " | one",
        " | three",
    ] {
        assert!(out.contains(want), "psql output lacks {want:?}:\n{out}");
    }

    // 2. DDL through cn1 is visible through cn2 and on every DN primary.
    assert_eq!(scalar(&client2, "select count(*) from items").await?, "10");
    assert_eq!(
        scalar(&client2, "select name from items where id = 9").await?,
        "i"
    );
    let primaries = dn_primaries(&c).await;
    assert_eq!(
        primaries.len(),
        c.cfg.dn_groups.len(),
        "one primary per group"
    );
    let mut per_group = 0;
    for (name, dn) in &primaries {
        let n: i64 = scalar(dn, "select count(*) from items").await?.parse()?;
        assert!(
            n > 0 && n < 10,
            "{name} holds {n} of 10 rows: not distributed"
        );
        per_group += n;
        assert_eq!(
            scalar(dn, "select count(*) from kinds").await?,
            "3",
            "{name}"
        );
        assert_eq!(
            scalar(dn, "select count(*) from pg_prepared_xacts").await?,
            "0",
            "{name} keeps a prepared transaction"
        );
    }
    assert_eq!(per_group, 10, "every row lives on exactly one group");

    // 3. Extended protocol with a bound distribution value (tokio-postgres).
    let row = client
        .query_one("select name, grp from items where id = $1", &[&7i32])
        .await?;
    assert_eq!(row.get::<_, String>(0), "g");
    assert_eq!(row.get::<_, i32>(1), 1);
    let n = client
        .execute("update items set grp = grp where id = $1", &[&8i32])
        .await?;
    assert_eq!(n, 1);
    // The DNs keep a one-group extended-protocol statement prepared per connection: a
    // DDL that changes what its text means is seen at the next run.
    client
        .batch_execute("create table reshaped (id int primary key, a int)")
        .await?;
    client
        .batch_execute("insert into reshaped values (1, 10)")
        .await?;
    for _ in 0..3 {
        let row = client
            .query_one("select * from reshaped where id = $1", &[&1i32])
            .await?;
        assert_eq!(row.get::<_, i32>(1), 10);
    }
    client
        .batch_execute(
            "drop table reshaped; create table reshaped (id int primary key, a text, b int); \
             insert into reshaped values (1, 'x', 20)",
        )
        .await?;
    for _ in 0..3 {
        let row = client
            .query_one("select * from reshaped where id = $1", &[&1i32])
            .await?;
        assert_eq!(
            (row.get::<_, String>(1), row.get::<_, i32>(2)),
            ("x".to_owned(), 20)
        );
    }

    // 3b. Protocol: savepoints on every group a transaction touches, a cancel request
    //     reaches the DN backend, ParameterStatus follows SET, the DN's own errors.
    protocol_checks(cn1_port, &client).await?;
    flush_and_sync(cn1_port).await?;
    client
        .batch_execute(
            "create table wide (id int8 primary key, v int4); \
             insert into wide values (1, 10), (2, 20), (3, 30), (4, 40)",
        )
        .await?;
    simple_query_column_types(cn1_port).await?;
    // The CN reaches a DN on its own host by the DN's Unix socket (client_port -1).
    assert_eq!(
        scalar(
            &client,
            "select client_port from pg_stat_activity where pid = pg_backend_pid()"
        )
        .await?,
        "-1",
        "the CN's DN connection is not the DN's Unix socket"
    );

    // 4. Differential: the same rows in one plain PostgreSQL (a database of its own on
    //    a DN primary, which is a stock PostgreSQL 15).
    let (_, any_dn) = &primaries[0];
    any_dn.simple_query("drop database if exists plain").await?;
    any_dn.simple_query("create database plain").await?;
    let dn_port = c.port(&primaries[0].0);
    let (dn_user, dn_password) = mpp_ha_tests::dn_login()?;
    let mut pcfg = tokio_postgres::Config::new();
    pcfg.host("127.0.0.1")
        .port(dn_port)
        .user(&dn_user)
        .password(&dn_password)
        .dbname("plain");
    let (plain, pconn) = pcfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = pconn.await;
    });
    let setup = [
        "create table f (id int primary key, g int, amount int, tag text)",
        "create table d (id int, note text)",
        "create table dim (g int, gname text)",
    ];
    let cn_setup = [
        "create table f (id int primary key, g int, amount int, tag text)",
        "create table d (id int, note text) distribute by hash(id)",
        "create table dim (g int, gname text) distribute by replication",
    ];
    for (p, q) in setup.iter().zip(cn_setup.iter()) {
        plain.simple_query(p).await?;
        client.simple_query(q).await?;
    }
    let mut inserts = Vec::new();
    for i in 1..=60 {
        let tag = ["x", "y", "z"][i % 3];
        inserts.push(format!(
            "insert into f values ({i}, {}, {}, '{tag}')",
            i % 5,
            (i * 37) % 101
        ));
        if i % 2 == 0 {
            inserts.push(format!("insert into d values ({i}, 'n{i}')"));
        }
    }
    for g in 0..5 {
        inserts.push(format!("insert into dim values ({g}, 'g{g}')"));
    }
    for q in &inserts {
        plain.simple_query(q).await?;
        client.simple_query(q).await?;
    }
    let ordered = [
        "select * from f where id = 17",
        "select tag, amount from f where id = 42",
        "select id, amount from f order by amount desc, id limit 7",
        "select id from f order by id limit 5 offset 10",
        "select g, count(*), sum(amount), min(amount), max(amount), avg(amount) from f group by g order by g",
        "select tag, count(*) from f group by tag having count(*) > 19 order by tag",
        "select g, sum(amount) from f group by g having sum(amount) > 900 order by 2 desc",
        "select count(*), sum(amount), avg(amount) from f",
        "select count(*) from f where amount > 1000",
        "select f.id, d.note from f join d on f.id = d.id where f.amount > 50 order by f.id",
        "select f.id, dim.gname from f join dim on f.g = dim.g order by f.id limit 10",
        "select dim.gname, count(*) from f join dim on f.g = dim.g group by dim.gname order by dim.gname",
    ];
    for q in ordered {
        let want = normalise(rows(&plain, q).await?);
        let got = normalise(rows(&client, q).await.with_context(|| q.to_owned())?);
        assert_eq!(got, want, "differs from plain PostgreSQL: {q}");
    }
    // One-group simple queries run on the DN as named statements of their shape with
    // the literals as parameters: each means what the text means (each twice: the
    // second run finds the statement prepared).
    let point = [
        "select 'tag:' || tag, 5, amount from f where id = 17",
        "select 'lit', amount from f where id = 18",
        "select tag from f where id = '19'",
        "select amount from f where id = 20 and amount < 2147483648",
        "select amount from f where id = 21 and amount < 99999999999999999999",
        "select id, amount, 3 from f where id = 22 order by 3, 1",
    ];
    // A group of rows on one DN group, where a literal that names a column matters.
    for (p, q) in [
        (
            "create table m (k int, v int, w text)",
            "create table m (k int, v int, w text) distribute by hash(k)",
        ),
        (
            "insert into m values (1, 1, 'a'), (1, 2, 'b'), (1, 3, 'a'), (1, 4, 'c')",
            "insert into m values (1, 1, 'a'), (1, 2, 'b'), (1, 3, 'a'), (1, 4, 'c')",
        ),
    ] {
        plain.simple_query(p).await?;
        client.simple_query(q).await?;
    }
    let point = point.iter().chain(&[
        "select v, w from m where k = 1 order by 1 desc",
        "select w, count(*) from m where k = 1 group by 1 order by 2 desc, 1",
    ]);
    for q in point.clone().chain(point) {
        let want = normalise(rows(&plain, q).await?);
        let got = normalise(rows(&client, q).await.with_context(|| q.to_owned())?);
        assert_eq!(got, want, "differs from plain PostgreSQL: {q}");
    }
    for q in [
        "select tag from f where id = 23 and tag = 5",
        "select tag from f where id = 24 and amount = 'x'",
    ] {
        for _ in 0..2 {
            let want = plain
                .simple_query(q)
                .await
                .err()
                .context("plain accepted it")?;
            let got = client
                .simple_query(q)
                .await
                .err()
                .context("the CN accepted it")?;
            assert_eq!(sqlstate(&got), sqlstate(&want), "{q}: {got:?} / {want:?}");
        }
    }
    // DEALLOCATE and DISCARD ALL act on the client's session, which lives in the CN: a
    // pooler's reset query (PgBouncer's DISCARD ALL, Npgsql's on close) works.
    let stmt = client.prepare("select amount from f where id = $1").await?;
    let want = normalise(rows(&plain, "select amount from f where id = 25").await?);
    let got = client.query(&stmt, &[&25i32]).await?;
    assert_eq!(got.len(), want.len());
    client.simple_query("set statement_timeout = '17s'").await?;
    client.simple_query("deallocate all").await?;
    let e = client
        .query(&stmt, &[&25i32])
        .await
        .err()
        .context("a deallocated statement ran")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e:?}");
    let e = client
        .simple_query("deallocate nosuch")
        .await
        .err()
        .context("deallocate nosuch")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e:?}");
    assert_eq!(scalar(&client, "show statement_timeout").await?, "17s");
    client.simple_query("begin").await?;
    let e = client
        .simple_query("discard all")
        .await
        .err()
        .context("discard all in a block")?;
    assert_eq!(sqlstate(&e).as_deref(), Some("25001"), "{e:?}");
    client.simple_query("rollback").await?;
    client.simple_query("discard all").await?;
    assert_eq!(
        scalar(&client, "show statement_timeout").await?,
        scalar(&plain, "show statement_timeout").await?
    );
    for id in [26, 27] {
        let q = format!("select amount from f where id = {id}");
        let want = normalise(rows(&plain, &q).await?);
        assert_eq!(normalise(rows(&client, &q).await?), want, "{q}");
    }
    let unordered = [
        "select id, tag from f where amount < 20",
        "select * from dim",
    ];
    for q in unordered {
        let mut want = normalise(rows(&plain, q).await?);
        let mut got = normalise(rows(&client, q).await?);
        want.sort();
        got.sort();
        assert_eq!(got, want, "differs from plain PostgreSQL: {q}");
    }
    drop(plain);

    // 5. Shapes the CN cannot answer correctly: 0A000, never a wrong answer.
    for q in [
        "select * from f join d on f.g = d.id",
        "select id from f where id in (select id from d)",
        "select count(distinct g) from f",
        "select id from f limit 3",
        "update f set id = id + 1000 where id = 1",
        "select row_number() over (order by id) from f",
    ] {
        let e = client
            .simple_query(q)
            .await
            .err()
            .with_context(|| format!("{q} succeeded"))?;
        let code = e.code().map(|c| c.code().to_owned());
        assert_eq!(code.as_deref(), Some("0A000"), "{q}: {e}");
    }
    // The DN's own error, unchanged.
    let e = client
        .simple_query("select 1/0")
        .await
        .err()
        .context("1/0 succeeded")?;
    assert_eq!(e.code().map(|c| c.code()), Some("22012"));

    // 6. pgbench -i and a 30 s TPC-B run through the CN; the sums agree and every
    //    transaction pgbench counts as processed left its history row (no more).
    pgbench(cn1_port, &["-i", "-s", "2"])?;
    assert_eq!(
        scalar(&client, "select count(*) from pgbench_accounts").await?,
        "200000"
    );
    let run = pgbench(cn1_port, &["-c", "4", "-T", "30", "-M", "prepared"])?;
    assert!(run.contains("number of failed transactions: 0"), "{run}");
    let processed = mpp_ha_tests::pgbench_processed(&run).context("no processed count")?;
    let a = scalar(&client, "select sum(abalance) from pgbench_accounts").await?;
    let b = scalar(&client, "select sum(bbalance) from pgbench_branches").await?;
    let t = scalar(&client, "select sum(tbalance) from pgbench_tellers").await?;
    assert!(
        a == b && b == t,
        "sums disagree: accounts {a}, branches {b}, tellers {t}"
    );
    let h: u64 = scalar(&client, "select count(*) from pgbench_history")
        .await?
        .parse()?;
    assert!(processed > 0, "pgbench processed nothing:\n{run}");
    assert_eq!(
        h, processed,
        "history rows against processed transactions:\n{run}"
    );

    // 7. A CN killed after the decision and before phase two: restarted by its agent,
    //    its resolver commits the DDL on every DN primary and on both CNs' catalogs.
    let fault = c.base_dir().join("cn1").join("test_fault");
    std::fs::write(&fault, "exit_after_decision")?;
    let r = client
        .simple_query("create table after_decision (id int)")
        .await;
    assert!(r.is_err(), "the CN must die before answering");
    drop(client);
    wait_for(
        "cn1 to stop at the fault point",
        Duration::from_secs(10),
        || async { Ok(cn_client(cn1_port).await.is_err().then_some(())) },
    )
    .await?;
    wait_for(
        "the resolver to commit on every DN",
        Duration::from_secs(60),
        || async {
            let primaries = dn_primaries(&c).await;
            if primaries.len() != c.cfg.dn_groups.len() {
                return Ok(None);
            }
            for (_, dn) in primaries {
                let left = scalar(&dn, "select count(*) from pg_prepared_xacts").await?;
                let exists = scalar(
                    &dn,
                    "select (to_regclass('after_decision') is not null)::text",
                )
                .await?;
                if left != "0" || exists != "true" {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    // cn1's output (its agent's log file for it).
    let log = std::fs::read_to_string(c.base_dir().join("cn1.cn.log")).unwrap_or_default();
    assert!(
        log.contains("test fault point"),
        "cn1 did not stop at the fault point"
    );
    let client = wait_cn(cn1_port).await?;
    client
        .simple_query("insert into after_decision values (1)")
        .await?;
    wait_for(
        "cn2 to finish the catalog change",
        Duration::from_secs(30),
        || async {
            Ok(client2
                .simple_query("insert into after_decision values (2)")
                .await
                .is_ok()
                .then_some(()))
        },
    )
    .await?;

    // 8. A DN primary killed during phase one: the DDL fails, and nothing is left
    //    prepared or created on any DN, nor in the catalog.
    std::fs::write(&fault, "pause_before_prepare")?;
    let ddl_client = wait_cn(cn1_port).await?;
    let ddl = tokio::spawn(async move {
        ddl_client
            .simple_query("create table half_done (id int)")
            .await
            .map(|_| ())
    });
    let primaries = dn_primaries(&c).await;
    let victim = primaries
        .iter()
        .find(|(name, _)| name.starts_with("dn2"))
        .map(|(name, _)| name.clone())
        .context("no dn2 primary")?;
    let victim_client = &primaries
        .iter()
        .find(|(n, _)| *n == victim)
        .context("victim")?
        .1;
    wait_for("the DDL to be open on the victim", Duration::from_secs(10), || async {
        let n = scalar(
            victim_client,
            "select count(*) from pg_stat_activity where application_name = 'mpp-ha-cn' and state = 'idle in transaction'",
        )
        .await?;
        Ok((n != "0").then_some(()))
    })
    .await?;
    let pid = c.postmaster_pid(&victim).context("victim postmaster pid")?;
    kill9(pid);
    let r = tokio::time::timeout(Duration::from_secs(30), ddl).await??;
    assert!(
        r.is_err(),
        "the DDL must fail when a DN primary dies in phase one"
    );
    wait_for(
        "nothing prepared or created anywhere",
        Duration::from_secs(90),
        || async {
            let primaries = dn_primaries(&c).await;
            if primaries.len() != c.cfg.dn_groups.len() {
                return Ok(None);
            }
            for (_, dn) in primaries {
                let left = scalar(&dn, "select count(*) from pg_prepared_xacts").await?;
                let exists =
                    scalar(&dn, "select (to_regclass('half_done') is not null)::text").await?;
                if left != "0" || exists != "false" {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    // The catalog took nothing either: the same DDL works once the group is back.
    wait_for(
        "the DDL to succeed after recovery",
        Duration::from_secs(60),
        || async {
            let c1 = wait_cn(cn1_port).await?;
            Ok(c1
                .simple_query("create table half_done (id int)")
                .await
                .is_ok()
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}
