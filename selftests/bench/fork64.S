/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: a fork-like copy-and-write-protect of a 4-MiB address space. One op =
 * copy the parent's two page tables (1,024 PTEs) into the child's with the writable bit
 * cleared in both, reload the parent's CR3, then switch to the child and write 64 of its
 * pages, switch back and write the same 64 pages in the parent: each write takes a guest
 * #PF whose handler makes the PTE writable again and INVLPGs (copy-on-write without the
 * copy). Prints "fork ticks/op: N".
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set VA, 0x8000000000
	.set TABLES, 0x400000		/* the parent's tables */
	.set CHILD, 0x410000		/* the child's, laid out the same way */
	.set FRAMES, 0x1000000
	.set NPAGES, 1024
	.set IDT, 0x420000
	.set N, 8
_start:
	/* IDT with a #PF gate. */
	lea	rax, [rip + pf_handler]
	mov	rdi, IDT + 14 * 16
	mov	word ptr [rdi], ax
	mov	word ptr [rdi + 2], 0x8
	mov	word ptr [rdi + 4], 0x8e00
	shr	rax, 16
	mov	word ptr [rdi + 6], ax
	shr	rax, 16
	mov	dword ptr [rdi + 8], eax
	mov	dword ptr [rdi + 12], 0
	lea	rax, [rip + idtr]
	lidt	[rax]
	call	map_private
	/* The child's upper levels (its PTs are filled by each fork). */
	mov	rax, [0x1000]
	mov	[CHILD], rax
	mov	qword ptr [CHILD + 8], CHILD + 0x1000 + 3
	mov	qword ptr [CHILD + 0x1000], CHILD + 0x2000 + 3
	mov	qword ptr [CHILD + 0x2000], CHILD + 0x3000 + 3
	mov	qword ptr [CHILD + 0x2008], CHILD + 0x4000 + 3
	call	fork			/* warm */
	call	tsc_start
	mov	r13d, N
1:	call	fork
	dec	r13d
	jnz	1b
	mov	rcx, N
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	print_ticks
	jmp	done

fork:
	xor	ecx, ecx
2:	mov	rax, [TABLES + 0x3000 + rcx * 8]
	and	rax, ~2
	mov	[TABLES + 0x3000 + rcx * 8], rax
	mov	[CHILD + 0x3000 + rcx * 8], rax
	inc	ecx
	cmp	ecx, NPAGES
	jne	2b
	mov	rax, TABLES
	mov	cr3, rax
	mov	rax, CHILD
	mov	cr3, rax
	call	write_pages
	mov	rax, TABLES
	mov	cr3, rax
	jmp	write_pages

/* write_pages: a byte into every 16th page of the 4 MiB. */
write_pages:
	movabs	rdi, VA
	mov	ecx, NPAGES / 16
3:	mov	byte ptr [rdi], 1
	add	rdi, 16 * 0x1000
	dec	ecx
	jnz	3b
	ret

/* #PF: make the PTE of CR2 writable in the current tables (PTs at CR3 + 0x3000). */
pf_handler:
	push	rax
	push	rdx
	mov	rax, cr2
	movabs	rdx, VA
	sub	rax, rdx
	shr	rax, 12
	mov	rdx, cr3
	or	qword ptr [rdx + 0x3000 + rax * 8], 2
	mov	rax, cr2
	invlpg	[rax]
	pop	rdx
	pop	rax
	add	rsp, 8
	iretq

	.include "tables.inc"
	.include "lib.inc"

	.data
idtr:	.word	256 * 16 - 1
	.quad	IDT
msg:	.asciz	"fork"
