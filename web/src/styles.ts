// A strict Content-Security-Policy (`style-src 'self'`, no 'unsafe-inline') blocks the <style>
// elements xterm.js writes its per-terminal rules into (theme colours, row heights). Those rules
// are data, not code, so they are mirrored into constructable stylesheets
// (`document.adoptedStyleSheets`), which the policy does not govern, instead of loosening it.

const sheets = new WeakMap<HTMLStyleElement, CSSStyleSheet>();
const texts = new WeakMap<HTMLStyleElement, string>();
const textContent = Object.getOwnPropertyDescriptor(Node.prototype, "textContent");

function sheetOf(element: HTMLStyleElement): CSSStyleSheet {
  let sheet = sheets.get(element);
  if (!sheet) {
    sheet = new CSSStyleSheet();
    sheets.set(element, sheet);
    document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
  }
  return sheet;
}

/** Installs the mirroring; call once before any terminal opens. */
export function mirrorInjectedStyles(): void {
  if (!textContent?.set || !("adoptedStyleSheets" in Document.prototype)) return;
  Object.defineProperty(HTMLStyleElement.prototype, "textContent", {
    configurable: true,
    get(this: HTMLStyleElement) {
      return texts.get(this) ?? textContent.get?.call(this);
    },
    set(this: HTMLStyleElement, value: string) {
      // The element itself stays empty: the policy would refuse its text anyway, with a console
      // error each time.
      texts.set(this, value ?? "");
      sheetOf(this).replaceSync(value ?? "");
    },
  });
  // When xterm.js removes its element (terminal disposed), drop the mirrored sheet too.
  const remove = Element.prototype.remove;
  HTMLStyleElement.prototype.remove = function (this: HTMLStyleElement) {
    const sheet = sheets.get(this);
    if (sheet) document.adoptedStyleSheets = document.adoptedStyleSheets.filter((item) => item !== sheet);
    sheets.delete(this);
    remove.call(this);
  };
}
