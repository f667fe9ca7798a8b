//! Every transition of the state machine, table-driven, and the pure rules around it.

use super::*;

struct Case {
    name: &'static str,
    from: fn() -> Upload,
    event: fn() -> Event,
    /// `None`: refused, and the record must be unchanged.
    to: Option<(&'static str, &'static [&'static str])>,
}

const fn case(
    name: &'static str,
    from: fn() -> Upload,
    event: fn() -> Event,
    to: Option<(&'static str, &'static [&'static str])>,
) -> Case {
    Case {
        name,
        from,
        event,
        to,
    }
}

const CASES: &[Case] = &[
    case(
        "connect: requested is described again",
        requested_idle,
        || Event::AgentConnected { conn: conn() },
        Some(("requested", &["describe"])),
    ),
    case(
        "connect: uploading is described again",
        uploading_away,
        || Event::AgentConnected { conn: conn() },
        Some(("uploading", &["describe"])),
    ),
    case(
        "connect: verifying waits for its check",
        verifying,
        || Event::AgentConnected { conn: conn() },
        None,
    ),
    case(
        "connect: an ending upload is not described",
        ending,
        || Event::AgentConnected { conn: conn() },
        None,
    ),
    case(
        "disconnect: its own connection",
        uploading,
        || Event::AgentDisconnected { conn: conn() },
        Some(("uploading", &[])),
    ),
    case(
        "disconnect: another connection",
        uploading,
        || Event::AgentDisconnected {
            conn: ConnId::for_test(8),
        },
        None,
    ),
    case(
        "described: requested creates the multipart upload",
        requested,
        described,
        Some(("requested", &["create"])),
    ),
    case("described: not asked", requested_idle, described, None),
    case(
        "described: by a connection that does not own it",
        requested,
        || Event::Described {
            agent: stranger(),
            facts: Ok(facts()),
        },
        None,
    ),
    case(
        "described: a rejected description fails it",
        requested,
        || Event::Described {
            agent: agent(),
            facts: Err(Rejection {
                code: ErrorCode::FileTooLarge,
                message: "big".into(),
            }),
        },
        Some(("ending failed", &["tell_cancel", "abort"])),
    ),
    case(
        "described again: the same file resumes",
        uploading_described_again,
        described,
        Some(("uploading", &["list_parts"])),
    ),
    case(
        "described again: a changed file fails",
        uploading_described_again,
        || {
            let mut f = facts();
            f.size += 1;
            Event::Described {
                agent: agent(),
                facts: Ok(f),
            }
        },
        Some(("ending failed", &["tell_cancel", "abort"])),
    ),
    case(
        "described again: only the modification time moved",
        uploading_described_again,
        || {
            let mut f = facts();
            f.modified_ms += 1000;
            Event::Described {
                agent: agent(),
                facts: Ok(f),
            }
        },
        Some(("uploading", &["list_parts"])),
    ),
    case(
        "created: requested starts uploading",
        requested_idle,
        || Event::MultipartCreated {
            facts: facts(),
            multipart: transfer().multipart,
        },
        Some(("uploading", &["presign"])),
    ),
    case(
        "created with a part manifest: copy the unchanged parts first",
        requested_idle,
        || Event::MultipartCreated {
            facts: FileFacts {
                part_digests: Some(vec![Sha256Hex::parse(&"b".repeat(64)).unwrap(); 3]),
                ..facts()
            },
            multipart: transfer().multipart,
        },
        Some(("uploading", &["copy_unchanged"])),
    ),
    case(
        "copied: presign the rest",
        uploading,
        || Event::PartsCopied {
            stored: all_parts_stored()[..1].to_vec(),
        },
        Some(("uploading", &["count", "presign"])),
    ),
    case(
        "copied: nothing copied, presign everything",
        uploading,
        || Event::PartsCopied { stored: Vec::new() },
        Some(("uploading", &["presign"])),
    ),
    case(
        "copied: too late, the upload is ending",
        ending,
        || Event::PartsCopied {
            stored: all_parts_stored(),
        },
        None,
    ),
    case(
        "created: too late, the upload is ending",
        ending,
        || Event::MultipartCreated {
            facts: facts(),
            multipart: transfer().multipart,
        },
        None,
    ),
    case(
        "listed: presign what is missing",
        uploading,
        || Event::PartsListed {
            stored: all_parts_stored(),
            why: Resume::Reconnect,
        },
        Some(("uploading", &["count", "presign"])),
    ),
    case(
        "listed: not uploading",
        verifying,
        || Event::PartsListed {
            stored: Vec::new(),
            why: Resume::Refresh,
        },
        None,
    ),
    case(
        "gone: verify what the agent may have completed",
        uploading,
        || Event::MultipartGone,
        Some(("verifying", &["verify"])),
    ),
    case(
        "gone: not uploading",
        requested_idle,
        || Event::MultipartGone,
        None,
    ),
    case(
        "plan ready: send it",
        uploading,
        || Event::PlanReady { plan: plan(1) },
        Some(("uploading", &["send_plan"])),
    ),
    case(
        "plan ready: the agent is away",
        uploading_away,
        || Event::PlanReady { plan: plan(1) },
        None,
    ),
    case(
        "progress: counted",
        uploading,
        || progress(agent()),
        Some(("uploading", &["count"])),
    ),
    case(
        "progress: from another connection",
        uploading,
        || progress(stranger()),
        None,
    ),
    case(
        "progress: before uploading",
        requested_idle,
        || progress(agent()),
        None,
    ),
    case(
        "need urls: list again",
        uploading,
        || Event::NeedUrls { agent: agent() },
        Some(("uploading", &["list_parts"])),
    ),
    case(
        "need urls: from another connection",
        uploading,
        || Event::NeedUrls { agent: stranger() },
        None,
    ),
    case(
        "completed: verify",
        uploading,
        || completed_by(agent()),
        Some(("verifying", &["verify"])),
    ),
    case(
        "completed: twice",
        verifying,
        || completed_by(agent()),
        None,
    ),
    case(
        "completed: from another connection",
        uploading,
        || completed_by(stranger()),
        None,
    ),
    case(
        "agent failed: no word back",
        uploading,
        agent_failed,
        Some(("ending failed", &["abort"])),
    ),
    case(
        "agent failed: another client's upload",
        uploading,
        || Event::AgentFailed {
            client_id: ClientId::parse("store-2").unwrap(),
            code: ErrorCode::FileNotFound,
            message: String::new(),
            sha256: None,
        },
        None,
    ),
    case("agent failed: already ending", ending, agent_failed, None),
    case(
        "verified: completed",
        verifying,
        || Event::Verified {
            etag: "\"e-3\"".into(),
        },
        Some(("completed", &["count"])),
    ),
    case(
        "verified: not verifying",
        uploading,
        || Event::Verified {
            etag: "\"e-3\"".into(),
        },
        None,
    ),
    case(
        "fail: requested, nothing to abort but the agent told",
        requested,
        fail,
        Some(("ending failed", &["tell_cancel", "abort"])),
    ),
    case(
        "fail: verifying deletes the object",
        verifying,
        fail,
        Some(("ending failed", &["tell_cancel", "delete_object", "abort"])),
    ),
    case(
        "fail: the agent is away",
        uploading_away,
        fail,
        Some(("ending failed", &["abort"])),
    ),
    case("fail: already ending", ending, fail, None),
    case("fail: completed", completed, fail, None),
    case(
        "cancel: uploading",
        uploading,
        || Event::Cancel {
            message: "by ops".into(),
        },
        Some(("ending cancelled", &["tell_cancel", "abort"])),
    ),
    case(
        "cancel: verifying deletes the object",
        verifying,
        || Event::Cancel {
            message: "by ops".into(),
        },
        Some((
            "ending cancelled",
            &["tell_cancel", "delete_object", "abort"],
        )),
    ),
    case(
        "agent failed to complete: look for the object",
        uploading,
        || Event::AgentFailed {
            client_id: client(),
            code: ErrorCode::CompleteFailed,
            message: "lost".into(),
            sha256: None,
        },
        Some(("verifying", &["verify"])),
    ),
    case(
        "verify deferred: storage could not be read",
        verifying,
        || Event::VerifyDeferred { if_missing: None },
        Some(("verifying", &[])),
    ),
    case(
        "verify deferred: not verifying",
        uploading,
        || Event::VerifyDeferred { if_missing: None },
        None,
    ),
    case(
        "verify again: due",
        verifying_deferred,
        || Event::VerifyAgain,
        Some(("verifying", &["verify"])),
    ),
    case(
        "verify again: not yet",
        verifying_deferred_later,
        || Event::VerifyAgain,
        None,
    ),
    case(
        "verify again: nothing deferred",
        verifying,
        || Event::VerifyAgain,
        None,
    ),
    case(
        "cancel: completed",
        completed,
        || Event::Cancel {
            message: "by ops".into(),
        },
        None,
    ),
    case(
        "aborted: the ending is done",
        ending,
        || Event::Aborted,
        Some(("failed", &["count"])),
    ),
    case("aborted: not ending", uploading, || Event::Aborted, None),
];

#[test]
fn every_transition() {
    for c in CASES {
        let mut u = (c.from)();
        let before = format!("{u:?}");
        let result = u.on((c.event)(), Now::read());
        match (c.to, result) {
            (None, Err(_)) => assert_eq!(
                format!("{u:?}"),
                before,
                "{}: a refusal changed the record",
                c.name
            ),
            (None, Ok(effects)) => panic!("{}: accepted, with {effects:?}", c.name),
            (Some((_, _)), Err(refused)) => panic!("{}: refused ({})", c.name, refused.0),
            (Some((stage, kinds)), Ok(effects)) => {
                assert_eq!(stage_name(&u), stage, "{}", c.name);
                let got: Vec<_> = effects.iter().map(kind).collect();
                assert_eq!(got, kinds, "{}", c.name);
            }
        }
    }
}

#[test]
fn a_resume_plans_only_the_missing_parts() {
    let mut u = uploading();
    let mut stored = all_parts_stored();
    stored.remove(1); // part 2 never arrived
    stored[1].size -= 1; // part 3 is short
    let effects = u
        .on(
            Event::PartsListed {
                stored,
                why: Resume::Reconnect,
            },
            Now::read(),
        )
        .unwrap();
    let Some(Effect::Presign { missing, done, .. }) = effects.last() else {
        panic!("{effects:?}");
    };
    let n = |n| PartNumber::new(n).unwrap();
    assert_eq!(missing, &vec![n(2), n(3)]);
    assert_eq!(
        done.iter().map(|p| p.part_number).collect::<Vec<_>>(),
        vec![n(1)]
    );
}

#[test]
fn copied_parts_count_only_when_storage_holds_them_intact() {
    let mut u = uploading();
    let mut stored = all_parts_stored();
    stored[2].size -= 1; // part 3 was copied short: it is sent instead
    let effects = u.on(Event::PartsCopied { stored }, Now::read()).unwrap();
    let Some(Effect::Presign { missing, done, .. }) = effects.last() else {
        panic!("{effects:?}");
    };
    let n = |n| PartNumber::new(n).unwrap();
    assert_eq!(missing, &vec![n(3)]);
    assert_eq!(done.len(), 2);
    assert_eq!(u.copied.parts, 2);
    assert_eq!(u.copied.bytes, 10 * MIB);
    assert!(matches!(
        effects[0],
        Effect::Count(Counter::Copied { parts: 2, bytes }) if bytes == 10 * MIB
    ));
}

#[test]
fn fruitless_refreshes_end_in_stalled() {
    let mut u = uploading();
    let now = Now::read();
    for _ in 1..MAX_FRUITLESS_REFRESHES {
        let effects = u
            .on(
                Event::PartsListed {
                    stored: Vec::new(),
                    why: Resume::Refresh,
                },
                now,
            )
            .unwrap();
        assert_eq!(kind(effects.last().unwrap()), "presign");
    }
    u.on(
        Event::PartsListed {
            stored: Vec::new(),
            why: Resume::Refresh,
        },
        now,
    )
    .unwrap();
    assert_eq!(u.stage.error().map(|e| e.code), Some(ErrorCode::Stalled));
}

#[test]
fn progress_is_clamped_and_retries_counted_once() {
    let mut u = uploading();
    let effects = u.on(progress(agent()), Now::read()).unwrap();
    assert_eq!(effects, vec![Effect::Count(Counter::PartRetries(2))]);
    assert_eq!((u.parts_done, u.bytes_done), (3, 12 * MIB));
    // The same count again is nothing new.
    assert!(u.on(progress(agent()), Now::read()).unwrap().is_empty());
}

#[test]
fn overdue_uploads() {
    let (response, stall) = (Duration::from_secs(30), Duration::from_secs(300));
    let now = Instant::now();
    let later = now + Duration::from_secs(31);
    let u = requested();
    assert_eq!(u.overdue(now, response, stall), None);
    assert_eq!(
        u.overdue(later, response, stall).map(|o| o.0),
        Some(ErrorCode::AgentTimeout)
    );
    let u = uploading_away();
    assert_eq!(u.overdue(later, response, stall), None);
    let (code, message) = u.overdue(now + stall * 2, response, stall).unwrap();
    assert_eq!(code, ErrorCode::Stalled);
    assert!(message.contains("away"), "{message}");
    assert_eq!(ending().overdue(now + stall * 2, response, stall), None);
}

#[test]
fn only_a_live_upload_owns_its_multipart_upload() {
    assert!(requested().owns_multipart("anything"));
    assert!(uploading().owns_multipart("mpu-1"));
    assert!(!uploading().owns_multipart("mpu-2"));
    assert!(ending().owns_multipart("mpu-1"));
    assert!(!completed().owns_multipart("mpu-1"));
}

#[test]
fn keys_are_unique_and_under_the_client_prefix() {
    let file = FileName::parse("export.csv").unwrap();
    let id = UploadId::new_random();
    let a = object_key("uploads", &client(), id, &file, Encoding::None);
    let b = object_key(
        "uploads",
        &client(),
        UploadId::new_random(),
        &file,
        Encoding::None,
    );
    let zst = object_key("uploads", &client(), id, &file, Encoding::Zstd);
    assert!(zst.ends_with("/export.csv.zst"), "{zst}");
    assert_ne!(a, b);
    assert!(a.starts_with("uploads/store-1/"), "{a}");
    assert!(a.ends_with("/export.csv"), "{a}");
    assert_eq!(upload_id_of_key("uploads", &a), Some(id));
    assert_eq!(upload_id_of_key("other", &a), None);
    assert_eq!(upload_id_of_key("uploads", "uploads/x/nodash/f"), None);
}

/// Time passes only through the moments the machine is handed: each phase is the span between
/// the events that bound it, and the stamps are the wall times given.
#[test]
fn phases_are_the_time_between_events() {
    let start = Now::read();
    let (mut u, _) = Upload::requested(
        NewUpload {
            id: UploadId::new_random(),
            client_id: client(),
            share: FileName::parse("default").unwrap(),
            requested_by: "ops".into(),
            requested_from: "127.0.0.1:1".into(),
            collection: None,
            compression: Compression::Auto,
        },
        conn(),
        start,
    );
    let at = |ms: u64| Now {
        at: start.at + Duration::from_millis(ms),
        wall: UnixMs(start.wall.0 + ms as i64),
    };
    u.on(described(), at(250)).unwrap();
    u.on(
        Event::MultipartCreated {
            facts: facts(),
            multipart: transfer().multipart,
        },
        at(260),
    )
    .unwrap();
    u.on(Event::PlanReady { plan: plan(0) }, at(300)).unwrap();
    u.on(completed_by(agent()), at(1300)).unwrap();
    u.on(
        Event::Verified {
            etag: "\"e-3\"".into(),
        },
        at(1310),
    )
    .unwrap();
    let p = u.phases;
    assert_eq!(
        (
            p.describe_ms,
            p.presign_ms,
            p.transfer_ms,
            p.complete_ms,
            p.verify_ms
        ),
        (250, 50, 1000, 5, 10)
    );
    assert_eq!(u.created, start.wall);
    assert_eq!(u.finished, Some(at(1310).wall));
    assert_eq!(u.updated, at(1310).wall);
}

/// A verification that cannot read storage never fails the upload by itself, and one that
/// follows a lost completion reply fails with the agent's error only if the object is missing.
#[test]
fn deferred_verifications_keep_what_a_missing_object_means() {
    let mut u = uploading();
    let effects = u
        .on(
            Event::AgentFailed {
                client_id: client(),
                code: ErrorCode::CompleteFailed,
                message: "the answer was lost".into(),
                sha256: None,
            },
            Now::read(),
        )
        .unwrap();
    let Some(Effect::Verify { if_missing, .. }) = effects.first() else {
        panic!("{effects:?}");
    };
    let if_missing = if_missing.clone();
    assert_eq!(
        if_missing.as_ref().map(|e| e.code),
        Some(ErrorCode::CompleteFailed)
    );
    let now = Now::read();
    u.on(Event::VerifyDeferred { if_missing }, now).unwrap();
    assert!(!u.verify_due(now.at));
    assert!(
        u.overdue(now.at, Duration::from_secs(30), Duration::from_secs(300))
            .is_none()
    );
    let later = Now {
        at: now.at + VERIFY_AGAIN_AFTER,
        wall: now.wall,
    };
    assert!(u.verify_due(later.at));
    let effects = u.on(Event::VerifyAgain, later).unwrap();
    let Some(Effect::Verify { if_missing, .. }) = effects.first() else {
        panic!("{effects:?}");
    };
    assert_eq!(
        if_missing.as_ref().map(|e| e.code),
        Some(ErrorCode::CompleteFailed)
    );
}

/// A resumed upload is described in the layout it was planned with, not today's PART_SIZE.
#[test]
fn a_resume_asks_for_the_recorded_layout() {
    let mut u = uploading_away();
    let effects = u
        .on(Event::AgentConnected { conn: conn() }, Now::read())
        .unwrap();
    assert_eq!(
        effects,
        vec![Effect::Describe {
            conn: conn(),
            share: FileName::parse("default").unwrap(),
            part_size: Some(5 * MIB),
            // The recorded (plain) layout is asked for again.
            compression: Compression::None,
        }]
    );
    let (_, first) = Upload::requested(
        NewUpload {
            id: UploadId::new_random(),
            client_id: client(),
            share: FileName::parse("default").unwrap(),
            requested_by: "ops".into(),
            requested_from: "127.0.0.1:1".into(),
            collection: None,
            compression: Compression::Auto,
        },
        conn(),
        Now::read(),
    );
    assert!(matches!(
        first,
        Effect::Describe {
            part_size: None,
            ..
        }
    ));
}
