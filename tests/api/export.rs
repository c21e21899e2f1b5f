//! `GET /polls/{id}/export`: counts for everyone who may see them, the ledger for admins.

use crate::helpers::{ADMIN_TOKEN, Backend, SETTLE, TestApp};

async fn counts_export_as_csv_and_json(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["Tabs", "=cmd"]).await;
    app.api.vote(poll, 1, "u1").await;
    app.api.vote(poll, 1, "u2").await;
    app.api.wait_for_total(poll, 2, SETTLE).await;

    let resp = app
        .api
        .http
        .get(app.api.url(&format!("/polls/{poll}/export?format=csv")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.contains(&format!("poll-{poll}-counts.csv")));
    let csv = resp.text().await.unwrap();
    assert_eq!(csv, "option_id,option,votes\r\n1,Tabs,2\r\n2,'=cmd,0\r\n");

    let (status, json) = app
        .api
        .get(&format!("/polls/{poll}/export?format=json"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(json["totalVotes"], 2);
    assert_eq!(json["options"][0]["votes"], 2);
}

async fn the_ledger_export_needs_the_admin_token(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    for i in 0..3 {
        app.api.vote(poll, 2, &format!("u{i}")).await;
    }
    app.api.wait_for_total(poll, 3, SETTLE).await;
    let path = format!("/polls/{poll}/export?format=csv&data=ledger");
    let (status, body) = app.api.get(&path).await;
    assert_eq!(status, 401, "{body}");

    let get = |path: String| {
        app.api
            .http
            .get(app.api.url(&path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let csv = get(path.clone()).await.unwrap().text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "row,user_id,vote_id,option_ids,voted_at,current");
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains(",2,") && l.ends_with(",true"))
    );

    // Paging: two rows, then the rest from the cursor the header gives.
    let first = get(format!("{path}&limit=2")).await.unwrap();
    let next = first.headers()["pollcast-next-after"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(first.text().await.unwrap().lines().count(), 3);
    let rest = get(format!("{path}&limit=2&after={next}")).await.unwrap();
    assert!(rest.headers().get("pollcast-next-after").is_none());
    assert_eq!(rest.text().await.unwrap().lines().count(), 2);
}

async fn a_bad_export_query_is_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    for query in ["format=xml", "data=everything", "limit=0&data=ledger"] {
        let resp = app
            .api
            .http
            .get(app.api.url(&format!("/polls/{poll}/export?{query}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 422, "{query}");
    }
    let (status, _) = app.api.get("/polls/999999/export").await;
    assert_eq!(status, 404);
}

crate::contract_tests!(
    counts_export_as_csv_and_json,
    the_ledger_export_needs_the_admin_token,
    a_bad_export_query_is_422,
);
