//! The event log's tests: numbering, paging, rotation, torn lines, followers, adoption.
use super::*;
use px_proto::beacon::Level;

fn draft(kind: EventKind, app: Option<&str>, message: &str) -> EventDraft {
    EventDraft {
        app: app.map(str::to_owned),
        ..EventDraft::new(kind, message)
    }
}

#[test]
fn events_after_a_raised_floor_follow_a_resume_from_the_previous_beacons_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let floor = crate::lease::generation_floor(2);
    {
        let log = EventLog::open(dir.path()).unwrap();
        log.record(draft(EventKind::NodeJoined, None, "before the takeover"));
        log.raise_floor(floor);
        let after = log.record(draft(EventKind::NodeJoined, None, "after the takeover"));
        assert_eq!(after.seq, floor + 1);
        // A follower of the previous Beacon (epoch 1) resumes from a seq of its own numbers.
        let resumed = log.page(Some(crate::lease::generation_floor(1) + 40), 100, None);
        assert_eq!(seqs(&resumed), [floor + 1]);
        // A lower floor changes nothing.
        log.raise_floor(1);
        assert_eq!(
            log.record(draft(EventKind::NodeJoined, None, "next")).seq,
            floor + 2
        );
    }
    let reopened = EventLog::open(dir.path()).unwrap();
    assert_eq!(
        reopened
            .record(draft(EventKind::NodeJoined, None, "after a restart"))
            .seq,
        floor + 3
    );
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

#[test]
fn record_assigns_seq_time_and_level_and_pages_filter_by_app_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.last_seq(), 0);

    let first = log.record(EventDraft {
        level: None,
        node: Some("web-1".into()),
        release: Some(7),
        detail: Some("exit status 1".into()),
        ..draft(
            EventKind::CrashLoop,
            Some("hello"),
            "hello crash-loops on web-1",
        )
    });
    assert_eq!(first.seq, 1);
    assert_eq!(first.level, Level::Error);
    assert_eq!(first.node.as_deref(), Some("web-1"));
    assert_eq!(first.release, Some(7));
    assert_eq!(first.detail.as_deref(), Some("exit status 1"));
    humantime::parse_rfc3339(&first.at).unwrap();

    let second = log.record(draft(EventKind::DeployStarted, Some("other"), "deploy"));
    assert_eq!(second.level, Level::Info);
    log.record(draft(EventKind::InstanceCrashed, Some("hello"), "crashed"));
    log.record(draft(EventKind::NodeJoined, None, "web-2 joined"));
    log.record(draft(EventKind::DeployFinished, Some("hello"), "done"));
    assert_eq!(log.last_seq(), 5);

    assert_eq!(seqs(&log.page(None, 100, None)), [1, 2, 3, 4, 5]);
    assert_eq!(seqs(&log.page(Some(2), 100, None)), [3, 4, 5]);
    assert_eq!(seqs(&log.page(None, 2, None)), [1, 2]);
    assert_eq!(seqs(&log.page(Some(5), 100, None)), Vec::<u64>::new());
    assert_eq!(seqs(&log.page(None, 100, Some("hello"))), [1, 3, 5]);
    assert_eq!(seqs(&log.page(Some(1), 1, Some("hello"))), [3]);
    assert_eq!(log.page(None, 100, None)[0], first);

    assert_eq!(seqs(&log.recent(2)), [5, 4]);
    assert_eq!(seqs(&log.recent(100)), [5, 4, 3, 2, 1]);
    assert_eq!(log.write_errors(), 0);

    // Every event is one line of the file, in order.
    let text = std::fs::read_to_string(dir.path().join(EVENT_LOG_FILE)).unwrap();
    let on_disk: Vec<Event> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(seqs(&on_disk), [1, 2, 3, 4, 5]);
}

#[test]
fn a_page_is_at_most_max_page_and_memory_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    for i in 0..EVENTS_IN_MEMORY + 10 {
        log.record(draft(EventKind::NodeJoined, None, &format!("event {i}")));
    }
    assert_eq!(log.page(None, usize::MAX, None).len(), MAX_PAGE);
    // The ten oldest fell out of memory: an unpaged listing starts after them.
    assert_eq!(log.page(None, 1, None)[0].seq, 11);
    assert_eq!(log.page(Some(3), 1, None)[0].seq, 11);
    assert_eq!(log.recent(usize::MAX).len(), EVENTS_IN_MEMORY);
}

#[test]
fn restart_keeps_history_and_continues_seq() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let log = EventLog::open(dir.path()).unwrap();
        log.record(draft(EventKind::NodeJoined, None, "one"));
        log.record(draft(EventKind::DeployStarted, Some("hello"), "two"));
        log.record(draft(EventKind::DeployFinished, Some("hello"), "three"));
        log.page(None, 100, None)
    };
    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.last_seq(), 3);
    assert_eq!(log.page(None, 100, None), before);
    assert_eq!(seqs(&log.page(Some(1), 100, Some("hello"))), [2, 3]);
    assert_eq!(log.record(draft(EventKind::NodeLost, None, "four")).seq, 4);
}

#[test]
fn the_file_rotates_at_the_size_bound_keeping_one_old_file() {
    const LIMIT: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join(EVENT_LOG_FILE);
    let rotated = dir.path().join(ROTATED_EVENT_LOG_FILE);
    let log = EventLog::open_with_limit(dir.path(), LIMIT).unwrap();

    let mut n = 0;
    while !rotated.exists() {
        n += 1;
        assert!(n < 100, "no rotation after {n} events");
        log.record(draft(
            EventKind::NodeJoined,
            None,
            "a node joined the cluster",
        ));
        assert!(std::fs::metadata(&live).unwrap().len() <= LIMIT);
    }
    let first_rotation = std::fs::read(&rotated).unwrap();
    assert!(first_rotation.len() as u64 <= LIMIT);
    // The rotation happened because the next line would not fit: it is at least as long
    // as the last line of the rotated file (same message, seq no shorter).
    let last_line = first_rotation[..first_rotation.len() - 1]
        .split(|b| *b == b'\n')
        .next_back()
        .unwrap();
    assert!(first_rotation.len() + last_line.len() + 1 > LIMIT as usize);

    // Rotating again replaces the old file: disk stays bounded.
    for _ in 0..2 * n {
        log.record(draft(
            EventKind::NodeJoined,
            None,
            "a node joined the cluster",
        ));
        assert!(std::fs::metadata(&live).unwrap().len() <= LIMIT);
        assert!(std::fs::metadata(&rotated).unwrap().len() <= LIMIT);
    }
    assert_ne!(std::fs::read(&rotated).unwrap(), first_rotation);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(log.write_errors(), 0);

    // A restart reloads both files, contiguous up to the newest event.
    let last = log.last_seq();
    drop(log);
    let log = EventLog::open_with_limit(dir.path(), LIMIT).unwrap();
    assert_eq!(log.last_seq(), last);
    let reloaded = seqs(&log.page(None, MAX_PAGE, None));
    let oldest = reloaded[0];
    assert!(
        reloaded.len() as u64 > n,
        "only {} events reloaded",
        reloaded.len()
    );
    assert_eq!(reloaded, (oldest..=last).collect::<Vec<_>>());
}

#[test]
fn torn_and_garbage_lines_are_skipped_and_new_events_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join(EVENT_LOG_FILE);
    {
        let log = EventLog::open(dir.path()).unwrap();
        log.record(draft(EventKind::NodeJoined, None, "one"));
        log.record(draft(EventKind::NodeJoined, None, "two"));
    }
    let mut file = OpenOptions::new().append(true).open(&live).unwrap();
    file.write_all(b"not json at all\n\xff\xfe\n").unwrap();
    file.write_all(br#"{"seq":3,"at":"2024-01-01T00:00:00Z","kind":"node_jo"#)
        .unwrap();
    drop(file);

    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.last_seq(), 2);
    assert_eq!(seqs(&log.page(None, 100, None)), [1, 2]);
    let three = log.record(draft(EventKind::NodeLost, None, "three"));
    assert_eq!(three.seq, 3);
    drop(log);

    // Had the new line been glued to the torn one, event 3 would be lost here.
    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.page(None, 100, None).last(), Some(&three));
    assert_eq!(seqs(&log.page(None, 100, None)), [1, 2, 3]);
}

#[test]
fn subscribers_receive_new_events_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    log.record(draft(EventKind::NodeJoined, None, "before"));
    let mut rx = log.subscribe();
    let a = log.record(draft(EventKind::DeployStarted, Some("hello"), "a"));
    let b = log.record(draft(EventKind::DeployFinished, Some("hello"), "b"));
    assert_eq!(rx.try_recv().unwrap(), a);
    assert_eq!(rx.try_recv().unwrap(), b);
    assert!(rx.try_recv().is_err());
}

#[test]
fn a_slow_subscriber_lags_instead_of_holding_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let mut rx = log.subscribe();
    for _ in 0..SUBSCRIBER_BUFFER + 5 {
        log.record(draft(EventKind::NodeJoined, None, "x"));
    }
    assert_eq!(
        rx.try_recv(),
        Err(broadcast::error::TryRecvError::Lagged(5))
    );
    assert_eq!(rx.try_recv().unwrap().seq, 6);
}

#[test]
fn disk_errors_are_counted_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open_with_limit(dir.path(), 100).unwrap();
    // A non-empty directory where the rotated file goes makes the rename fail, even as root.
    std::fs::create_dir_all(dir.path().join(ROTATED_EVENT_LOG_FILE).join("x")).unwrap();
    log.record(draft(EventKind::NodeJoined, None, "fits before rotating"));
    assert_eq!(log.write_errors(), 0);
    let event = log.record(draft(EventKind::NodeLost, None, "needs a rotation"));
    assert!(log.write_errors() >= 1);
    assert_eq!(event.seq, 2);
    assert_eq!(log.page(Some(1), 10, None), [event]);
}

#[test]
fn long_messages_and_details_are_clipped_at_a_char_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let event = log.record(EventDraft {
        level: None,
        detail: Some("é".repeat(MAX_DETAIL_BYTES)),
        ..draft(
            EventKind::InstanceCrashed,
            None,
            &"x".repeat(5 * MAX_MESSAGE_BYTES),
        )
    });
    assert!(event.message.len() <= MAX_MESSAGE_BYTES);
    assert!(event.message.len() > MAX_MESSAGE_BYTES - 8);
    assert!(event.message.ends_with('…'));
    let detail = event.detail.unwrap();
    assert!(detail.len() <= MAX_DETAIL_BYTES);
    assert!(detail.ends_with('…'));
    assert_eq!(clip("short".into(), 10), "short");
}

#[test]
fn adopted_events_of_a_predecessor_come_before_this_beacons_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let theirs_dir = tempfile::tempdir().unwrap();
    let theirs = EventLog::open(theirs_dir.path()).unwrap();
    theirs.raise_floor(crate::lease::generation_floor(1));
    let first = theirs.record(draft(EventKind::DeployStarted, Some("shop"), "one"));
    let second = theirs.record(draft(EventKind::DeployFinished, Some("shop"), "two"));

    let log = EventLog::open(dir.path()).unwrap();
    // Adopted twice (a retried load): each event is kept once.
    assert_eq!(log.adopt(vec![first.clone(), second.clone()]), 2);
    assert_eq!(log.adopt(vec![second.clone()]), 0);
    let floor = crate::lease::generation_floor(2);
    log.raise_floor(floor);
    let mine = log.record(draft(EventKind::NodeJoined, None, "three"));
    assert_eq!(mine.seq, floor + 1);
    assert_eq!(
        log.page(None, 100, None),
        [first.clone(), second.clone(), mine]
    );
    assert_eq!(
        seqs(&log.page(Some(first.seq), 100, Some("shop"))),
        [second.seq]
    );
    // Memory keeps the newest EVENTS_IN_MEMORY, adopted or not.
    let many: Vec<Event> = (0..EVENTS_IN_MEMORY as u64)
        .map(|i| Event {
            seq: i + 1,
            ..first.clone()
        })
        .collect();
    log.adopt(many);
    assert_eq!(log.recent(usize::MAX).len(), EVENTS_IN_MEMORY);
    assert_eq!(log.recent(1)[0].seq, floor + 1);
}
