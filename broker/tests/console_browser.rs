//! The web console in a real browser: a headless chromium drives the page
//! served by an in-process broker, as a person would (forms, buttons,
//! links), and every page is checked for uncaught exceptions, console
//! errors and failed API calls. A PNG of every page is saved under
//! `<target>/console-screenshots/`.
//!
//! The browser is `$CHROME`, else `chromium` or `chromium-browser` on the
//! PATH. Without one the tests print "skipped: no chromium" and pass, unless
//! `CI` is set: then they fail (`.ci/run` installs chromium).
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dmq_broker::{Broker, BrokerConfig};
use dmq_client::{Client, ClientOptions, GroupSettings, Start, SubscribeOptions};
use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::Input::InsertText;
use headless_chrome::protocol::cdp::Log::LogEntryLevel;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::protocol::cdp::Runtime::ConsoleAPICalledEventTypeOption;
use headless_chrome::types::Bounds;
use headless_chrome::{Browser, LaunchOptions, Tab};

/// How long any one thing may take to appear on the page.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The browser window (and screenshot width).
const WINDOW: (u32, u32) = (1280, 1000);
/// Screenshots are cut at this height.
const SCREENSHOT_HEIGHT_MAX: u32 = 4000;

/// The browser to drive: `$CHROME`, else chromium on the PATH.
fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROME").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let search = std::env::var_os("PATH")?;
    std::env::split_paths(&search)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The browser, or None when the test should be skipped (panics under CI).
fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    match find_chromium() {
        Some(path) => Some(path),
        None if std::env::var_os("CI").is_some() => {
            panic!("{test}: no chromium ($CHROME, chromium or chromium-browser) and CI is set")
        }
        None => {
            println!("{test}: skipped: no chromium (set CHROME or install chromium)");
            None
        }
    }
}

fn launch(chromium: PathBuf) -> anyhow::Result<Browser> {
    launch_with(chromium, &[])
}

/// [`launch`] with more chromium flags.
fn launch_with(chromium: PathBuf, extra: &[&OsStr]) -> anyhow::Result<Browser> {
    let mut args = vec![
        OsStr::new("--no-proxy-server"),
        OsStr::new("--disable-gpu"),
        OsStr::new("--lang=en-US"),
    ];
    args.extend_from_slice(extra);
    let options = LaunchOptions::default_builder()
        .path(Some(chromium))
        .headless(true)
        // Tests run as root, where chromium's sandbox cannot start.
        .sandbox(false)
        .window_size(Some(WINDOW))
        .idle_browser_timeout(Duration::from_secs(120))
        .args(args)
        .build()
        .map_err(|e| anyhow!("launch options: {e}"))?;
    Browser::new(options).context("starting chromium")
}

/// Where screenshots go: `$CARGO_TARGET_DIR` or the workspace's `target/`.
fn screenshot_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    target.join("console-screenshots")
}

/// A broker on its own runtime (the browser side is synchronous).
struct Running {
    runtime: tokio::runtime::Runtime,
    broker: Option<Broker>,
    _data: tempfile::TempDir,
}

impl Running {
    fn start(admin_tokens: Vec<String>) -> Running {
        let data = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = BrokerConfig {
            data_dir: data.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            fsync: "never".to_string(),
            admin_tokens,
            ..BrokerConfig::default()
        };
        let broker = runtime.block_on(Broker::start(config)).unwrap();
        Running {
            runtime,
            broker: Some(broker),
            _data: data,
        }
    }

    fn url(&self) -> String {
        let addr: SocketAddr = self.broker.as_ref().unwrap().admin_addr();
        format!("http://{addr}/")
    }

    /// Subscribes group `group` of `topic` from its end, allowing one
    /// attempt per message: the first message it gets is rejected (so it is
    /// dead-lettered), every later one acked.
    fn reject_first(&self, topic: &str, group: &str) {
        let addr = self.broker.as_ref().unwrap().protocol_addr();
        let (topic, group) = (topic.to_string(), group.to_string());
        let mut subscription = self.runtime.block_on(async move {
            let client = Client::connect(addr.to_string(), ClientOptions::new("console-test"))
                .await
                .unwrap();
            let options = SubscribeOptions {
                member_name: "console-test".into(),
                start: Start::Latest,
                settings: GroupSettings {
                    max_attempts: Some(1),
                    ..GroupSettings::default()
                },
                ..SubscribeOptions::default()
            };
            let subscription = client
                .consumer()
                .subscribe(&topic, &group, options)
                .await
                .unwrap();
            // The subscription keeps its own handle on the connection.
            drop(client);
            subscription
        });
        self.runtime.spawn(async move {
            let mut first = true;
            while let Some(Ok(message)) = subscription.recv().await {
                let settled = if first {
                    message.nack(None).await
                } else {
                    message.ack().await
                };
                first = false;
                if settled.is_err() {
                    return;
                }
            }
        });
    }

    /// Begins a transaction of one message on `topic` and leaves it open
    /// (its producer "went away"); returns its handle.
    fn open_transaction(&self, topic: &str) -> u64 {
        let addr = self.broker.as_ref().unwrap().protocol_addr();
        let topic = topic.to_string();
        self.runtime.block_on(async move {
            let client = Client::connect(addr.to_string(), ClientOptions::new("console-test"))
                .await
                .unwrap();
            let mut txn = client.transaction("console-shop", "order-1");
            txn.send(vec![dmq_client::Message::new(topic, "in a transaction")])
                .await
                .unwrap();
            txn.handle()
        })
    }

    fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            self.runtime.block_on(broker.shutdown());
        }
    }
}

/// What went wrong in the page: exceptions, console errors, failed calls.
type Problems = Arc<Mutex<Vec<String>>>;

/// Opens a tab that records every problem into the returned list.
fn watched_tab(browser: &Browser) -> anyhow::Result<(Arc<Tab>, Problems)> {
    let tab = browser.new_tab()?;
    tab.set_default_timeout(STEP_TIMEOUT);
    let problems: Problems = Arc::default();
    let sink = Arc::clone(&problems);
    tab.add_event_listener(Arc::new(move |event: &Event| {
        let problem = match event {
            Event::RuntimeExceptionThrown(thrown) => {
                let details = &thrown.params.exception_details;
                let description = details
                    .exception
                    .as_ref()
                    .and_then(|exception| exception.description.clone())
                    .unwrap_or_default();
                Some(format!(
                    "uncaught exception: {} {description} ({}:{})",
                    details.text,
                    details.url.clone().unwrap_or_default(),
                    details.line_number
                ))
            }
            Event::RuntimeConsoleAPICalled(call)
                if call.params.Type == ConsoleAPICalledEventTypeOption::Error =>
            {
                let args: Vec<String> = call
                    .params
                    .args
                    .iter()
                    .map(|arg| {
                        arg.value
                            .as_ref()
                            .map(|value| value.to_string())
                            .or_else(|| arg.description.clone())
                            .unwrap_or_default()
                    })
                    .collect();
                Some(format!("console.error: {}", args.join(" ")))
            }
            Event::LogEntryAdded(entry) if entry.params.entry.level == LogEntryLevel::Error => {
                Some(format!(
                    "console: {} ({})",
                    entry.params.entry.text,
                    entry.params.entry.url.clone().unwrap_or_default()
                ))
            }
            Event::NetworkResponseReceived(received) if received.params.response.status >= 400 => {
                Some(format!(
                    "failed call: HTTP {} {}",
                    received.params.response.status, received.params.response.url
                ))
            }
            Event::NetworkLoadingFailed(failed) if failed.params.canceled != Some(true) => {
                Some(format!("request failed: {}", failed.params.error_text))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            sink.lock().unwrap().push(problem);
        }
    }))?;
    tab.enable_runtime()?;
    tab.enable_log()?;
    // Turns on the Network domain, whose events the listener reads.
    tab.register_response_handling("network", Box::new(|_, _| {}))?;
    Ok((tab, problems))
}

/// Fails if the page has reported any problem so far.
fn assert_clean(problems: &Problems, step: &str) -> anyhow::Result<()> {
    let problems = problems.lock().unwrap();
    if !problems.is_empty() {
        bail!(
            "{step}: the page reported problems:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Expects the problems reported since the last check to be about an
/// expected HTTP `status` only (and at least one), then forgets them.
fn expect_only(problems: &Problems, status: &str, step: &str) -> anyhow::Result<()> {
    let seen: Vec<String> = problems.lock().unwrap().drain(..).collect();
    if seen.is_empty() || seen.iter().any(|problem| !problem.contains(status)) {
        bail!("{step}: expected only HTTP {status} problems, got {seen:?}");
    }
    Ok(())
}

/// A JavaScript string literal.
fn js(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// Evaluates `expression` in the page (awaiting a promise) and returns its
/// JSON value.
///
/// Every DevTools call costs about 100 ms with headless_chrome's transport,
/// so the helpers below do their waiting inside the page, one call each.
fn eval(tab: &Tab, expression: &str) -> anyhow::Result<serde_json::Value> {
    let result = tab.evaluate(expression, true)?;
    Ok(result.value.unwrap_or(serde_json::Value::Null))
}

/// JavaScript: a promise of the first truthy value of `probe` (an
/// expression, polled every 20 ms), or of null after [`STEP_TIMEOUT`].
fn js_wait(probe: &str) -> String {
    format!(
        "new Promise((resolve) => {{ const deadline = Date.now() + {}; \
         const poll = () => {{ let found = null; try {{ found = ({probe}); }} catch (_) {{}} \
         if (found) resolve(found); else if (Date.now() > deadline) resolve(null); \
         else setTimeout(poll, 20); }}; poll(); }})",
        STEP_TIMEOUT.as_millis()
    )
}

/// Fails with `what`, adding the error boxes the page shows.
fn timed_out(tab: &Tab, what: &str) -> anyhow::Error {
    let shown = eval(
        tab,
        "[...document.querySelectorAll('.error')].map((e) => e.textContent).join(' | ')",
    )
    .unwrap_or_default();
    anyhow!("timed out waiting for {what}; errors shown: {shown}")
}

/// Waits until `expression` is true in the page.
fn wait_until(tab: &Tab, what: &str, expression: &str) -> anyhow::Result<()> {
    if eval(tab, &format!("{}.then(Boolean)", js_wait(expression)))? != true {
        return Err(timed_out(tab, what));
    }
    Ok(())
}

/// The text of the first element matching `selector` ("" if none).
fn text(tab: &Tab, selector: &str) -> anyhow::Result<String> {
    let value = eval(
        tab,
        &format!(
            "document.querySelector({})?.textContent ?? ''",
            js(selector)
        ),
    )?;
    Ok(value.as_str().unwrap_or_default().to_string())
}

/// Waits until the element matching `selector` contains `wanted`.
fn wait_text(tab: &Tab, selector: &str, wanted: &str) -> anyhow::Result<()> {
    wait_until(
        tab,
        &format!("{selector:?} to contain {wanted:?}"),
        &format!(
            "(document.querySelector({})?.textContent ?? '').includes({})",
            js(selector),
            js(wanted)
        ),
    )
}

/// JavaScript: the element matching `selector` once it is shown and enabled.
fn js_usable(selector: &str) -> String {
    js_wait(&format!(
        "(() => {{ const e = document.querySelector({}); \
         return e && !e.disabled && e.offsetParent !== null ? e : null; }})()",
        js(selector)
    ))
}

/// Waits for `selector` to be shown and enabled, then clicks it (a DOM
/// click: the same events a mouse click fires on a button or link).
fn click(tab: &Tab, selector: &str) -> anyhow::Result<()> {
    let clicked = eval(
        tab,
        &format!(
            "{}.then((e) => {{ if (!e) return false; e.click(); return true; }})",
            js_usable(selector)
        ),
    )?;
    if clicked != true {
        return Err(timed_out(tab, &format!("{selector:?} to be clickable")));
    }
    Ok(())
}

/// Clears the input `selector`, focuses it and types `value` (as text
/// input: the page sees the same `input` events as from a keyboard).
fn type_into(tab: &Tab, selector: &str, value: &str) -> anyhow::Result<()> {
    let focused = eval(
        tab,
        &format!(
            "{}.then((e) => {{ if (!e) return false; e.value = ''; e.focus(); \
             return document.activeElement === e; }})",
            js_usable(selector)
        ),
    )?;
    if focused != true {
        return Err(timed_out(tab, &format!("{selector:?} to take the focus")));
    }
    tab.call_method(InsertText {
        text: value.to_string(),
    })
    .with_context(|| format!("typing into {selector}"))?;
    Ok(())
}

/// Sets a control's value as a user would (with input and change events):
/// selects, checkboxes-free inputs, number fields.
fn set_value(tab: &Tab, selector: &str, value: &str) -> anyhow::Result<()> {
    let now = eval(
        tab,
        &format!(
            "{}.then((e) => {{ if (!e) return null; e.value = {}; \
             e.dispatchEvent(new Event('input', {{ bubbles: true }})); \
             e.dispatchEvent(new Event('change', {{ bubbles: true }})); return e.value; }})",
            js_usable(selector),
            js(value)
        ),
    )?;
    if now.as_str() != Some(value) {
        return Err(timed_out(
            tab,
            &format!("{selector:?} to take the value {value:?} (it has {now})"),
        ));
    }
    Ok(())
}

/// Goes to a console location (hash route).
fn go(tab: &Tab, hash: &str) -> anyhow::Result<()> {
    eval(tab, &format!("location.hash = {}; true", js(hash)))?;
    Ok(())
}

/// Saves a PNG of the whole page (up to a height) as `<name>.png`.
fn screenshot(tab: &Tab, name: &str) -> anyhow::Result<()> {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Scroll to the top, let charts settle (two frames), measure the page.
    let sizes = eval(
        tab,
        "window.scrollTo(0, 0); new Promise((done) => requestAnimationFrame(() => \
         requestAnimationFrame(() => done(`${document.documentElement.scrollHeight} \
         ${window.innerHeight}`))))",
    )?;
    let sizes: Vec<u64> = sizes
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|number| number.parse().ok())
        .collect();
    let [page, viewport] = sizes[..] else {
        bail!("cannot measure the page: {sizes:?}");
    };
    // The window is taller than its viewport (by the browser's frame).
    let frame = u64::from(WINDOW.1).saturating_sub(viewport);
    let height = u32::try_from(page + frame)
        .unwrap_or(SCREENSHOT_HEIGHT_MAX)
        .clamp(WINDOW.1, SCREENSHOT_HEIGHT_MAX);
    let resize = |height: u32| {
        tab.set_bounds(Bounds::Normal {
            left: None,
            top: None,
            width: Some(f64::from(WINDOW.0)),
            height: Some(f64::from(height)),
        })
    };
    // Resizing costs a few hundred ms: only for pages taller than the window.
    let tall = height > WINDOW.1;
    if tall {
        resize(height)?;
    }
    let png = tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true);
    if tall {
        resize(WINDOW.1)?;
    }
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png?).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs `steps`; on failure saves `failure-<name>.png` and adds the page's
/// text to the error.
fn with_evidence(
    tab: &Tab,
    name: &str,
    steps: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let result = steps();
    if let Err(error) = result {
        let _ = screenshot(tab, &format!("failure-{name}"));
        let page = eval(tab, "document.body.innerText").unwrap_or_default();
        return Err(error.context(format!(
            "at {} (screenshot failure-{name}.png); the page reads:\n{}",
            tab.get_url(),
            page.as_str().unwrap_or_default()
        )));
    }
    Ok(())
}

/// Development mode: a topic through its whole life, every page visited.
#[test]
fn console_drives_a_topic_through_its_life() -> anyhow::Result<()> {
    let Some(chromium) = chromium_or_skip("console_drives_a_topic_through_its_life") else {
        return Ok(());
    };
    let started = Instant::now();
    let running = Running::start(Vec::new());
    let browser = launch(chromium)?;
    let (tab, problems) = watched_tab(&browser)?;
    with_evidence(&tab, "development", || {
        development_flow(&tab, &problems, &running)
    })?;
    drop(tab);
    drop(browser);
    running.stop();
    println!(
        "console flow took {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        screenshot_dir().display()
    );
    Ok(())
}

/// Create, disable, approve a topic; send a message; find it four ways;
/// its page and trace; delete it; a dead letter resent; statistics.
fn development_flow(tab: &Tab, problems: &Problems, running: &Running) -> anyhow::Result<()> {
    const TOPIC: &str = "test.payments.order-paid";
    let url = &running.url();
    let row = |prefix: &str| format!("[data-testid=\"{prefix}-{TOPIC}\"]");

    // Topics: the list, then the create form with its live name preview.
    tab.navigate_to(url)?;
    wait_text(tab, "#mode-badge", "development")?;
    wait_until(
        tab,
        "the topic table",
        "!!document.querySelector('#topics-table')",
    )?;
    type_into(tab, "#topic-env", "test")?;
    type_into(tab, "#topic-department", "payments")?;
    wait_text(tab, "#topic-name-preview", "test.payments.…")?;
    type_into(tab, "#topic-name", "order-paid")?;
    wait_text(tab, "#topic-name-preview", TOPIC)?;
    type_into(tab, "#topic-owner", "alice")?;
    type_into(tab, "#topic-description", "An order was paid")?;
    type_into(tab, "#topic-business-use", "ship the order")?;
    set_value(tab, "#topic-partitions", "2")?;
    type_into(tab, "#topic-producers", "orders-service, billing")?;
    type_into(tab, "#topic-consumers", "shipping")?;
    click(tab, "#topic-create")?;
    wait_text(tab, "[data-testid=\"topic-created\"]", TOPIC)?;
    // Development mode approves at once; disable, then approve again. Only
    // the transitions the status allows are offered (docs/admin-api.md,
    // "Status transitions"): no Approve on an approved topic, no Disable on
    // a disabled one.
    let absent = |prefix: &str| format!("!document.querySelector({})", js(&row(prefix)));
    wait_text(tab, &row("topic-status"), "approved")?;
    wait_until(tab, "no approve button", &absent("approve"))?;
    click(tab, &row("disable"))?;
    wait_text(tab, &row("topic-status"), "disabled")?;
    wait_until(tab, "no disable button", &absent("disable"))?;
    click(tab, &row("approve"))?;
    wait_text(tab, &row("topic-status"), "approved")?;
    // A bad name is refused in the page, with a visible message.
    type_into(tab, "#topic-name", "Bad Name")?;
    click(tab, "#topic-create")?;
    wait_text(tab, "#topic-create-error-slot", "Name must be")?;
    assert_clean(problems, "topics page")?;
    screenshot(tab, "topics")?;

    // The topic page: fields, partitions, groups, chart, test message.
    click(tab, &row("topic-link"))?;
    wait_text(tab, "#topic-fields", "alice")?;
    wait_text(tab, "#topic-fields", "orders-service, billing")?;
    wait_until(
        tab,
        "two partitions",
        "document.querySelectorAll('#partitions-table tbody tr').length === 2",
    )?;
    wait_text(tab, "#topic-disk", "Disk use:")?;
    wait_until(
        tab,
        "the groups table",
        "!!document.querySelector('#groups-table')",
    )?;
    wait_until(
        tab,
        "the rate chart",
        "!!document.querySelector('#topic-chart .uplot canvas')",
    )?;
    type_into(tab, "#test-value", "{\"order\":17}")?;
    type_into(tab, "#test-key", "order-17")?;
    type_into(tab, "#test-headers", "trace-id: abc")?;
    click(tab, "#test-send")?;
    wait_until(
        tab,
        "the test message's id",
        "!!document.querySelector('#test-result-link')",
    )?;
    let id = text(tab, "#test-result-link")?;
    if id.len() != 32 {
        bail!("the test message id {id:?} is not 32 hex digits");
    }
    let partition = eval(
        tab,
        "document.querySelector('#test-result').dataset.partition",
    )?;
    let offset = eval(tab, "document.querySelector('#test-result').dataset.offset")?;
    let partition = partition.as_str().unwrap_or_default().to_string();
    let offset: u64 = offset.as_str().unwrap_or_default().parse()?;
    assert_clean(problems, "topic page")?;

    // The message browser: by id, by key, by time range, by offsets.
    let message_row = format!("[data-testid=\"msg-row-{id}\"]");
    let find = |by: &str| -> anyhow::Result<()> {
        set_value(tab, "#msg-by", by)?;
        click(tab, "#msg-search")?;
        wait_until(
            tab,
            &format!("the message found by {by}"),
            &format!("!!document.querySelector({})", js(&message_row)),
        )?;
        assert_clean(problems, &format!("message search by {by}"))
    };
    click(tab, "#nav-messages")?;
    wait_until(
        tab,
        "the topic choice",
        &format!(
            "[...document.querySelectorAll('#msg-topic option')].some((o) => o.value === {})",
            js(TOPIC)
        ),
    )?;
    set_value(tab, "#msg-topic", TOPIC)?;
    set_value(tab, "#msg-by", "id")?;
    type_into(tab, "#msg-id", &id)?;
    find("id")?;
    set_value(tab, "#msg-by", "key")?;
    type_into(tab, "#msg-key", "order-17")?;
    find("key")?;
    find("time")?;
    set_value(tab, "#msg-by", "offset")?;
    set_value(tab, "#msg-partition", &partition)?;
    set_value(tab, "#msg-from-offset", &offset.to_string())?;
    set_value(tab, "#msg-to-offset", &(offset + 1).to_string())?;
    find("offset")?;
    screenshot(tab, "messages")?;
    // An inverted range is refused by the broker: its message is shown.
    set_value(tab, "#msg-from-offset", "6")?;
    set_value(tab, "#msg-to-offset", "5")?;
    click(tab, "#msg-search")?;
    wait_until(
        tab,
        "the refusal",
        "!!document.querySelector('#msg-error-slot .error')",
    )?;
    expect_only(problems, "400", "an inverted range")?;
    set_value(tab, "#msg-by", "id")?;
    click(tab, "#msg-search")?;
    wait_until(
        tab,
        "the message found by id again",
        &format!("!!document.querySelector({})", js(&message_row)),
    )?;

    // Its detail page, then its trace.
    click(tab, &format!("[data-testid=\"msg-link-{id}\"]"))?;
    wait_text(tab, "#msg-fields", TOPIC)?;
    wait_text(tab, "#msg-fields", "order-17")?;
    wait_text(tab, "#msg-headers", "trace-id")?;
    wait_text(tab, "#msg-payload", "\"order\": 17")?;
    wait_until(
        tab,
        "the group table",
        "!!document.querySelector('#msg-groups')",
    )?;
    assert_clean(problems, "message page")?;
    screenshot(tab, "message")?;
    click(tab, "#msg-trace-link")?;
    for kind in ["produced", "stored"] {
        wait_until(
            tab,
            &format!("a {kind} event"),
            &format!(
                "!!document.querySelector('[data-testid=\"trace-event\"][data-kind=\"{kind}\"]')"
            ),
        )?;
    }
    assert_clean(problems, "trace page")?;
    screenshot(tab, "trace")?;

    // Delete it from the browser: the dry-run count, then the typed name.
    click(tab, "#trace-message-link")?;
    click(tab, "#msg-browse-link")?;
    wait_until(
        tab,
        "the message in the browser",
        &format!("!!document.querySelector({})", js(&message_row)),
    )?;
    click(tab, "#msg-delete-open")?;
    wait_until(
        tab,
        "the dry-run count",
        "document.querySelector('#delete-count')?.dataset.matched === '1'",
    )?;
    type_into(tab, "#delete-confirm", "test.payments")?;
    if eval(tab, "document.querySelector('#delete-submit').disabled")? != true {
        bail!("delete is enabled before the whole topic name is typed");
    }
    type_into(tab, "#delete-confirm", TOPIC)?;
    screenshot(tab, "delete-confirm")?;
    click(tab, "#delete-submit")?;
    wait_text(tab, "[data-testid=\"delete-done\"]", "Deleted 1 message")?;
    wait_until(
        tab,
        "the message shown deleted or gone",
        &format!(
            "(() => {{ const row = document.querySelector({}); \
             const table = document.querySelector('#msg-table'); \
             return row ? row.dataset.deleted === 'true' : !!table && table.textContent.includes('No message matches'); }})()",
            js(&message_row)
        ),
    )?;
    assert_clean(problems, "deleting")?;
    screenshot(tab, "messages-deleted")?;

    // A dead letter: a consumer allowing one attempt rejects a second
    // message; the topic page shows its group, the trace the move.
    running.reject_first(TOPIC, "shipping");
    go(tab, &format!("#/topic/{TOPIC}"))?;
    wait_until(
        tab,
        "the group on the topic page",
        "!!document.querySelector('[data-testid^=\"group-row-shipping-\"]')",
    )?;
    type_into(tab, "#test-value", "poison")?;
    type_into(tab, "#test-key", "dlq-me")?;
    click(tab, "#test-send")?;
    wait_until(
        tab,
        "the second message's id",
        "!!document.querySelector('#test-result-link')",
    )?;
    let poison = text(tab, "#test-result-link")?;
    go(tab, &format!("#/trace/{poison}"))?;
    wait_until(
        tab,
        "the page of the trace",
        &format!("location.hash.includes({})", js(&poison)),
    )?;
    // The consumer works on its own: look again until it has rejected.
    let dead =
        "!!document.querySelector('[data-testid=\"trace-event\"][data-kind=\"dead_lettered\"]')";
    for _ in 0..50 {
        if eval(tab, dead)? == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        click(tab, "#trace-go")?;
        wait_until(
            tab,
            "the trace",
            "!!document.querySelector('#trace-timeline, #trace-error-slot .error')",
        )?;
    }
    wait_until(tab, "a dead_lettered event", dead)?;
    // The trace form shows a 404 while the trace is not yet known.
    problems
        .lock()
        .unwrap()
        .retain(|problem| !problem.contains("404"));
    assert_clean(problems, "dead-letter trace")?;
    screenshot(tab, "trace-dead-lettered")?;
    go(tab, &format!("#/topic/{TOPIC}"))?;
    wait_until(
        tab,
        "the group on the topic page",
        "!!document.querySelector('[data-testid^=\"group-row-shipping-\"]')",
    )?;
    wait_until(
        tab,
        "the rate chart",
        "!!document.querySelector('#topic-chart .uplot canvas')",
    )?;
    screenshot(tab, "topic")?;

    // The dead-letter page: list, pick the message, resend it.
    let dlq_topic = format!("{TOPIC}.shipping.dlq");
    click(tab, "#nav-dlq")?;
    wait_text(
        tab,
        &format!("[data-testid=\"dlq-row-{dlq_topic}\"]"),
        "shipping",
    )?;
    click(tab, &format!("[data-testid=\"dlq-show-{dlq_topic}\"]"))?;
    click(tab, &format!("[data-testid=\"dlq-pick-{poison}\"]"))?;
    screenshot(tab, "dlq")?;
    click(tab, "#dlq-resend-selected")?;
    wait_text(tab, "[data-testid=\"dlq-resent\"]", "Resent 1 message")?;
    assert_clean(problems, "dead letters")?;

    // Transactions: an abandoned one is listed and committed by hand.
    let handle = running.open_transaction(TOPIC);
    click(tab, "#nav-transactions")?;
    wait_text(tab, &format!("[data-testid=\"tx-state-{handle}\"]"), "open")?;
    screenshot(tab, "transactions")?;
    click(tab, &format!("[data-testid=\"tx-commit-{handle}\"]"))?;
    click(
        tab,
        &format!("[data-testid=\"tx-confirm-commit-{handle}\"]"),
    )?;
    wait_text(tab, "[data-testid=\"tx-ended\"]", "committed")?;
    wait_text(tab, "#tx-list", "No open transactions.")?;
    assert_clean(problems, "transactions")?;

    // Statistics, the trace form.
    click(tab, "#nav-stats")?;
    wait_until(
        tab,
        "both statistics charts",
        "document.querySelectorAll('#page-stats .uplot canvas').length === 2",
    )?;
    set_value(tab, "#stats-topic", TOPIC)?;
    set_value(tab, "#stats-minutes", "15")?;
    wait_until(
        tab,
        "the filtered statistics",
        "location.hash.includes('minutes=15') && document.querySelectorAll('#page-stats .uplot canvas').length === 2",
    )?;
    wait_until(
        tab,
        "the totals",
        "!!document.querySelector('[data-testid=\"stats-total-produced\"]')",
    )?;
    assert_clean(problems, "statistics")?;
    screenshot(tab, "stats")?;
    click(tab, "#nav-trace")?;
    type_into(tab, "#trace-id", &id)?;
    click(tab, "#trace-go")?;
    wait_until(
        tab,
        "the trace from the form",
        "document.querySelectorAll('[data-testid=\"trace-event\"]').length >= 2",
    )?;
    assert_clean(problems, "trace form")?;

    // The cluster page of a single node says so.
    click(tab, "#nav-cluster")?;
    wait_text(tab, "[data-testid=\"cluster-single\"]", "single node")?;
    expect_only(problems, "404", "the cluster page of a single node")?;

    // An API error is shown, not thrown: a topic that does not exist.
    go(tab, "#/topic/no.such.topic")?;
    wait_until(
        tab,
        "the not-found message",
        "!!document.querySelector('#topic-error-slot .error')",
    )?;
    expect_only(problems, "404", "an unknown topic")
}

/// Production mode: the login form, a wrong token, the right one.
#[test]
fn console_asks_for_a_token_in_production() -> anyhow::Result<()> {
    let Some(chromium) = chromium_or_skip("console_asks_for_a_token_in_production") else {
        return Ok(());
    };
    const TOKEN: &str = "console-test-token";
    let hash = dmq_broker::auth::hash_secret(TOKEN)?;
    let running = Running::start(vec![hash]);
    let browser = launch(chromium)?;
    let (tab, problems) = watched_tab(&browser)?;
    with_evidence(&tab, "production", || {
        production_flow(&tab, &problems, &running.url(), TOKEN)
    })?;
    drop(tab);
    drop(browser);
    running.stop();
    Ok(())
}

/// Login refused, then accepted; a pending topic approved; the token kept
/// across a reload; logging out.
fn production_flow(tab: &Tab, problems: &Problems, url: &str, token: &str) -> anyhow::Result<()> {
    const TOPIC: &str = "prod.billing.invoice-sent";
    tab.navigate_to(&format!("{url}#/topics"))?;
    wait_until(
        tab,
        "the login form",
        "!!document.querySelector('#login-form')",
    )?;
    screenshot(tab, "login")?;
    type_into(tab, "#login-token", "not-the-token")?;
    click(tab, "#login-submit")?;
    wait_text(tab, "#login-error-slot", "not valid")?;
    if eval(tab, "sessionStorage.length")? != 0 {
        bail!("a refused token was stored");
    }
    type_into(tab, "#login-token", token)?;
    click(tab, "#login-submit")?;
    wait_until(
        tab,
        "the topics page",
        "!!document.querySelector('#topics-table')",
    )?;
    wait_text(tab, "#mode-badge", "production")?;
    // Only refusals so far (the first /api/info and the wrong token).
    expect_only(problems, "401", "logging in")?;

    // Logged in: a topic starts pending and is approved.
    type_into(tab, "#topic-env", "prod")?;
    type_into(tab, "#topic-department", "billing")?;
    type_into(tab, "#topic-name", "invoice-sent")?;
    type_into(tab, "#topic-owner", "bob")?;
    click(tab, "#topic-create")?;
    let status = format!("[data-testid=\"topic-status-{TOPIC}\"]");
    wait_text(tab, &status, "pending")?;
    // A pending topic can be approved, not disabled.
    let disable = format!("[data-testid=\"disable-{TOPIC}\"]");
    wait_until(
        tab,
        "no disable button on a pending topic",
        &format!("!document.querySelector({})", js(&disable)),
    )?;
    click(tab, &format!("[data-testid=\"approve-{TOPIC}\"]"))?;
    wait_text(tab, &status, "approved")?;
    // The token survives a reload of the tab (sessionStorage).
    tab.reload(true, None)?;
    wait_text(tab, &status, "approved")?;
    assert_clean(problems, "logged in")?;
    screenshot(tab, "topics-production")?;

    // Log out: back to the form.
    click(tab, "#logout")?;
    wait_until(
        tab,
        "the login form",
        "!!document.querySelector('#login-form')",
    )?;
    if eval(tab, "sessionStorage.length")? != 0 {
        bail!("the token is still stored after logging out");
    }
    Ok(())
}

/// Serves `page` as text/html to every request on a new 127.0.0.1 port (a
/// web site of another origin); returns its port.
fn serve_page(page: String) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    port
}

/// What the foreign page tries: the writes a web page can send without a
/// CORS preflight (text/plain bodies, no-cors), and a read.
fn hostile_page(admin: &str) -> String {
    format!(
        r#"<!doctype html><title>evil</title><script>
window.results = [];
const admin = {admin:?};
const topic = JSON.stringify({{environment: "x", department: "evil", name: "pwn", owner: "o"}});
(async () => {{
  const writes = [
    ["POST", "/api/topics", topic],
    ["POST", "/api/topics/dev.web.orders/test-message", JSON.stringify({{value: "injected"}})],
    ["POST", "/api/topics/dev.web.orders/messages/delete", JSON.stringify({{partition: 0, from_offset: 0, to_offset: 100, dry_run: false}})],
    ["POST", "/api/topics/dev.web.orders/disable", ""],
  ];
  for (const [method, path, body] of writes) {{
    try {{
      await fetch(admin + path, {{method, body: body || undefined, mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}}}});
      results.push("sent");
    }} catch (e) {{ results.push("blocked"); }}
  }}
  try {{
    const r = await fetch(admin + "/api/topics");
    results.push("read " + r.status);
  }} catch (e) {{ results.push("read blocked"); }}
  window.done = true;
}})();
</script>"#
    )
}

/// A web page of another origin (and one reached through a DNS name that
/// rebinds to 127.0.0.1) cannot create, inject, delete or disable anything
/// on a development-mode broker, nor read its answers.
#[test]
fn a_foreign_web_page_cannot_drive_a_development_broker() -> anyhow::Result<()> {
    let Some(chromium) = chromium_or_skip("a_foreign_web_page_cannot_drive_a_development_broker")
    else {
        return Ok(());
    };
    let running = Running::start(Vec::new());
    let admin: SocketAddr = running.broker.as_ref().unwrap().admin_addr();
    // A real topic the page goes after.
    let created = ureq::post(&format!("http://{admin}/api/topics"))
        .header("Content-Type", "application/json")
        .send(r#"{"environment":"dev","department":"web","name":"orders","owner":"o"}"#)
        .map_err(|e| anyhow!("creating the target topic: {e}"))?;
    assert_eq!(created.status().as_u16(), 201);
    // "evil.test" resolves to 127.0.0.1, as a rebinding DNS name would.
    let browser = launch_with(
        chromium,
        &[OsStr::new("--host-resolver-rules=MAP evil.test 127.0.0.1")],
    )?;
    let tab = browser.new_tab()?;
    for (site, target) in [
        ("127.0.0.1", format!("http://{admin}")),
        ("evil.test", format!("http://evil.test:{}", admin.port())),
    ] {
        let port = serve_page(hostile_page(&target));
        tab.navigate_to(&format!("http://{site}:{port}/"))?;
        tab.wait_until_navigated()?;
        wait_until(&tab, "the page's attempts", "window.done === true")?;
        let results = eval(&tab, "JSON.stringify(window.results)")?;
        let results = results.as_str().unwrap_or_default().to_string();
        // The read is refused: blocked by CORS from another origin, a 403
        // for a foreign Host reached through the rebinding name.
        assert!(
            results.contains("read blocked") || results.contains("read 403"),
            "{site}: {results}"
        );
    }
    // Nothing happened.
    let topics: serde_json::Value = ureq::get(&format!("http://{admin}/api/topics"))
        .call()
        .map_err(|e| anyhow!("{e}"))?
        .body_mut()
        .read_json()
        .map_err(|e| anyhow!("{e}"))?;
    let names: Vec<&str> = topics
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev.web.orders"], "a foreign page created a topic");
    assert_eq!(
        topics[0]["status"], "approved",
        "a foreign page disabled it"
    );
    let end: u64 = ureq::get(&format!("http://{admin}/api/topics/dev.web.orders"))
        .call()
        .map_err(|e| anyhow!("{e}"))?
        .body_mut()
        .read_json::<serde_json::Value>()
        .map_err(|e| anyhow!("{e}"))?["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(end, 0, "a foreign page injected a test message");
    // The same requests from the same origin, as the console sends them,
    // work: the refusals above are the origin's, not the requests'.
    let same_origin = ureq::post(&format!(
        "http://{admin}/api/topics/dev.web.orders/test-message"
    ))
    .header("Content-Type", "application/json")
    .send(r#"{"value":"from the console"}"#)
    .map_err(|e| anyhow!("{e}"))?;
    assert_eq!(same_origin.status().as_u16(), 200);
    drop(tab);
    drop(browser);
    running.stop();
    Ok(())
}
