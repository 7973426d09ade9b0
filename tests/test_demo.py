"""The demo page in a real browser: Chromium through Selenium, against the real Serve application on the session's
local Ray, serving the trained weights the package ships. Drawings are made with mouse and keyboard events,
as a person makes them; answers are checked against a flood fill of what was drawn. Screenshots go to
bench/results/demo/."""

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from polycolor import checkpoint
from polycolor.drawings import flood_fill

from conftest import free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "demo"
TEAL = (0, 128, 128)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="chromium and chromedriver not installed",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver")
Service = pytest.importorskip("selenium.webdriver.chrome.service").Service
ActionChains = pytest.importorskip("selenium.webdriver.common.action_chains").ActionChains
By = pytest.importorskip("selenium.webdriver.common.by").By
Keys = pytest.importorskip("selenium.webdriver.common.keys").Keys
WebDriverWait = pytest.importorskip("selenium.webdriver.support.ui").WebDriverWait


@pytest.fixture(scope="module")
def site(ray_session, tmp_path_factory):
    """The shipped weights served twice: open at /, and behind an API key at /kd (its palette with a name that
    is markup, which the page must show as text)."""
    from ray import serve

    from polycolor.serve import ServeConfig, application

    crafted = '<img src=x onerror="document.title=1">'
    loaded = checkpoint.load(checkpoint.PRETRAINED)
    keyed = checkpoint.write(
        tmp_path_factory.mktemp("demo") / "keyed",
        loaded.model,
        loaded.palette | {crafted: (0, 0, 255), "house-teal": TEAL},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        application(ServeConfig(checkpoint=str(checkpoint.PRETRAINED), cpus=0.5, ingress_cpus=0.1)),
        name="demo",
        route_prefix="/",
    )
    key = {"ray_actor_options": {"runtime_env": {"env_vars": {"POLYCOLOR_API_KEY": "k3y"}}}}
    serve.run(
        application(ServeConfig(checkpoint=str(keyed), cpus=0.5, ingress_cpus=0.1), ingress_options=key),
        name="kd",
        route_prefix="/kd",
    )
    yield {"url": f"http://127.0.0.1:{port}", "crafted": crafted}
    serve.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(site, browser):
    """The demo page, freshly loaded at desktop width."""
    browser.set_window_size(1100, 900)
    browser.get(f"{site['url']}/")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.readyState") == "complete")
    return browser


def at(browser, x: float, y: float) -> ActionChains:
    """Actions that move the mouse to the drawing's pixel (x, y) of its 256x256 (offsets are from the canvas's
    centre)."""
    overlay = browser.find_element(By.ID, "overlay")
    scale = overlay.rect["width"] / 256
    return ActionChains(browser).move_to_element_with_offset(
        overlay, round((x - 128) * scale), round((y - 128) * scale)
    )


def polygon(browser, corners: list[tuple[int, int]], tap_start: bool = False) -> None:
    """Click each corner with the polygon tool, then double-click the last to close the polygon (``tap_start``:
    click every corner, then the first again, as a finger on a touch screen would)."""
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=polygon]").click()
    for x, y in corners[:-1]:
        at(browser, x, y).click().perform()
    if tap_start:
        at(browser, *corners[-1]).click().perform()
        at(browser, *corners[0]).click().perform()
    else:
        at(browser, *corners[-1]).double_click().perform()


def freehand(browser, points: list[tuple[int, int]]) -> None:
    """Drag through ``points`` with the freehand tool."""
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=free]").click()
    overlay = browser.find_element(By.ID, "overlay")
    scale = overlay.rect["width"] / 256
    actions = at(browser, *points[0]).click_and_hold()
    for x, y in points[1:]:
        actions = actions.move_to_element_with_offset(overlay, round((x - 128) * scale), round((y - 128) * scale))
    actions.release().perform()


def choose(browser, colour: str) -> None:
    field = browser.find_element(By.ID, "color")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(colour)


def pixels(browser, script: str) -> np.ndarray:
    """(H, W, 3) uint8 of what ``script`` returns as a PNG data URL."""
    url = browser.execute_script(script)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


DRAWING = "return document.getElementById('canvas').toDataURL('image/png')"
RESULT = (
    "const i = document.getElementById('result'), c = document.createElement('canvas'); c.width = i.naturalWidth;"
    "c.height = i.naturalHeight; c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL('image/png');"
)


def result(browser) -> np.ndarray:
    """The answer the page shows once it has one for the drawing and colour as they are now (the result is
    ``aria-busy`` from a change until then)."""
    WebDriverWait(browser, 60).until(
        lambda b: b.execute_script(
            "const i = document.getElementById('result');"
            "return document.getElementById('result-stage').getAttribute('aria-busy') === 'false' && !i.hidden && "
            "i.complete && i.naturalWidth > 0;"
        )
    )
    return pixels(browser, RESULT)


def settled(browser) -> None:
    WebDriverWait(browser, 60).until(
        lambda b: b.find_element(By.ID, "result-stage").get_attribute("aria-busy") == "false"
    )


def screenshot(browser, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / name))


def iou(painted: np.ndarray, truth: np.ndarray) -> float:
    return float((painted & truth).sum() / (painted | truth).sum())


def test_a_drawn_polygon_is_filled_in_its_colour(page):
    """A drawn polygon is filled in the chosen colour, as a flood fill would fill it."""
    assert page.find_element(By.ID, "result").get_attribute("hidden") is not None  # no placeholder before a result
    choose(page, "teal")
    polygon(page, [(40, 50), (200, 36), (224, 190), (110, 222), (30, 160)])
    answer = result(page)
    drawn = pixels(page, DRAWING)
    painted = (answer != 255).any(axis=2)
    assert answer.shape == drawn.shape == (256, 256, 3)  # at the drawing's size
    assert iou(painted, flood_fill(drawn)) >= 0.99, iou(painted, flood_fill(drawn))
    assert {tuple(c) for c in answer[painted]} == {TEAL}  # exactly the colour asked for
    assert page.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
    assert page.find_element(By.ID, "picker").get_attribute("value") == "#008080"  # the colour painted, on the picker
    assert [b.get_attribute("aria-label") for b in page.find_elements(By.CSS_SELECTOR, "#recent button")] == [
        "Use teal"
    ]
    screenshot(page, "polygon.png")


def test_two_shapes_are_both_filled_and_nothing_else(page):
    choose(page, "orange")
    polygon(page, [(20, 30), (110, 24), (100, 120), (24, 110)])
    ring = [(185 + 50 * np.cos(t), 175 + 50 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 40)]
    freehand(page, [(round(x), round(y)) for x, y in ring])
    answer = result(page)
    truth = flood_fill(pixels(page, DRAWING))
    painted = (answer != 255).any(axis=2)
    assert ndimage.label(truth)[1] == 2 and ndimage.label(painted)[1] == 2  # two shapes drawn, two filled
    assert iou(painted, truth) >= 0.99, iou(painted, truth)
    assert not (painted & ~ndimage.binary_dilation(truth, iterations=2)).any()  # nothing painted away from them
    screenshot(page, "two-shapes.png")


def test_a_bad_colour_is_shown_beside_its_field(page):
    """A bad colour is shown beside the colour field, and a good one clears it."""
    choose(page, "blurple zz")
    polygon(page, [(60, 60), (196, 60), (128, 200)])
    settled(page)
    assert "unknown colour 'blurple zz'" in page.find_element(By.ID, "color-error").text
    assert (
        page.find_element(By.ID, "image-error").text == ""
        and page.find_element(By.ID, "result").get_attribute("hidden") is not None
    )
    screenshot(page, "bad-colour.png")
    choose(page, "#ff8800")
    answer = result(page)
    assert page.find_element(By.ID, "color-error").text == ""
    assert {tuple(c) for c in answer[(answer != 255).any(axis=2)]} == {(255, 136, 0)}


def test_undo_and_clear_change_what_is_filled(page):
    polygon(page, [(30, 30), (120, 30), (120, 120), (30, 120)])
    polygon(page, [(150, 150), (230, 150), (230, 230), (150, 230)], tap_start=True)
    both = result(page)
    page.find_element(By.ID, "undo").click()
    one = result(page)
    assert ndimage.label((both != 255).any(axis=2))[1] == 2 and ndimage.label((one != 255).any(axis=2))[1] == 1
    page.find_element(By.ID, "clear").click()
    settled(page)
    assert (
        page.find_element(By.ID, "result").get_attribute("hidden") is not None and (pixels(page, DRAWING) == 255).all()
    )


def test_controls_are_labelled_and_keyboard_draws(page):
    """Every control is labelled and a polygon can be drawn with the keyboard alone."""
    names = page.execute_script("""
        return Array.from(document.querySelectorAll('button, input, canvas[tabindex], a[href]'))
          .filter(e => !e.hidden)
          .map(e => [e.id || e.value, (e.labels && e.labels.length ? e.labels[0].textContent : '') ||
          e.getAttribute('aria-label') || e.textContent]);""")
    assert len(names) >= 10 and all(name.strip() for _, name in names), names
    canvas = page.find_element(By.ID, "overlay")
    page.execute_script("arguments[0].focus()", canvas)  # where Tab reaches it: it is in the tab order
    assert canvas.get_attribute("tabindex") == "0"
    for arrow in (Keys.ARROW_LEFT + Keys.ARROW_UP, Keys.ARROW_RIGHT * 2, Keys.ARROW_DOWN * 2, Keys.ARROW_LEFT * 2):
        canvas.send_keys(
            Keys.SHIFT, *(key * 4 for key in arrow)
        )  # 16 px a press with Shift: the corners of a 128 px square
        canvas.send_keys(" ")
    canvas.send_keys(Keys.ENTER)
    answer = result(page)
    truth = flood_fill(pixels(page, DRAWING))
    assert truth.sum() > 120 * 120 and iou((answer != 255).any(axis=2), truth) >= 0.99


def test_the_page_fits_a_phone(page):
    page.set_window_size(390, 844)
    polygon(page, [(50, 40), (210, 60), (180, 210), (40, 190)])
    result(page)
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    drawing, answer = (page.find_element(By.ID, i).rect for i in ("overlay", "result"))
    assert drawing["y"] == answer["y"] and drawing["x"] + drawing["width"] <= answer["x"]  # side by side
    screenshot(page, "phone.png")


def test_with_an_api_key_the_page_works_once_the_key_is_entered(site, browser):
    assert "house-teal" not in httpx.get(f"{site['url']}/kd/").text  # the palette is what /colors tells, behind the key
    browser.set_window_size(1100, 900)
    browser.get(f"{site['url']}/kd/")
    WebDriverWait(browser, 30).until(lambda b: "API key" in b.find_element(By.ID, "key-error").text)
    polygon(browser, [(60, 60), (196, 60), (196, 196), (60, 196)])
    settled(browser)
    assert (
        "API key" in browser.find_element(By.ID, "key-error").text
        and browser.find_element(By.ID, "result").get_attribute("hidden") is not None
    )
    browser.find_element(By.ID, "key").send_keys(
        "k3y\t"
    )  # typed, then focus moves on: the page asks /colors, then fills
    names = "return Array.from(document.getElementById('names').options, o => o.value)"
    WebDriverWait(browser, 30).until(lambda b: "house-teal" in b.execute_script(names))
    assert site["crafted"] in browser.execute_script(names) and browser.title == "polycolor"  # a value, not markup
    choose(browser, "house-teal")
    answer = result(browser)
    assert browser.find_element(By.ID, "key-error").text == ""
    assert {tuple(c) for c in answer[(answer != 255).any(axis=2)]} == {TEAL}


def test_the_docs_page_colours_an_uploaded_outline(site, browser, tmp_path):
    """S8: /docs renders from the service's own assets (this machine has no internet: loaded from a CDN it would
    stay blank), and its "Try it out" sends an uploaded outline and shows it filled in the colour asked for."""
    ink = np.zeros((128, 128), bool)
    ink[30:100, 30] = ink[30:100, 99] = ink[30, 30:100] = ink[99, 30:100] = True
    upload = tmp_path / "square.png"
    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(upload)
    browser.set_window_size(1200, 2000)
    browser.get(f"{site['url']}/docs")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-post"))
    block = browser.find_element(By.CSS_SELECTOR, ".opblock-post")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    WebDriverWait(browser, 10).until(lambda b: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    WebDriverWait(browser, 10).until(lambda b: block.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    block.find_element(By.CSS_SELECTOR, "tr[data-property-name='image'] input[type=file]").send_keys(str(upload))
    (colour,) = block.find_elements(By.CSS_SELECTOR, "tr[data-property-name='color'] input[type=text]")
    colour.clear()
    colour.send_keys("teal")
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    WebDriverWait(browser, 30).until(lambda b: block.find_elements(By.CSS_SELECTOR, ".live-responses-table img"))
    status = block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status").text
    centre = browser.execute_script(
        """const img = arguments[0], canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d'); context.drawImage(img, 0, 0);
        return Array.from(context.getImageData(64, 64, 1, 1).data.slice(0, 3));""",
        block.find_element(By.CSS_SELECTOR, ".live-responses-table img"),
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "docs.png"))
    assert status == "200" and tuple(centre) == TEAL
